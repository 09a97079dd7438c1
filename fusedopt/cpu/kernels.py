"""The numba CPU kernels: one parallel pass over every block of every tensor in a bucket, walking
the same int64 address table as the Triton kernels (fusedopt.kernels.TensorTable).

All numba code lives in this one file: numba's on-disk cache is invalidated by a change to the
file that defines a cached function, not by changes to the helpers it calls from other files.

Every rule gives three pieces, as on the GPU: its per-block numbers (`*_block_scalars`, fp64,
from the lr, the tensor's step count, its per-tensor integer and the launch's scalars, in the
order the rule's Triton arguments give them), its per-element update (`*_element`), and the
variants of state presence its table can have (`*_walk`). The walk over the elements of a block
(`walk_block`) and over the blocks (`run_blocks`) is shared. Options that decide which states
exist, and the rounding of the param, are compile-time constants of each walk (the loops then
vectorize); the others are numbers read in the loop, never multiplied in as 0 or 1 (g + 0*p
would turn an inf param into NaN).
"""
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# Rows of the tensor table (kernels/multi_tensor.py)
NUMEL_ROW, EXTRA_ROW, PARAM_ROW, GRAD_ROW, FIRST_STATE_ROW = 0, 1, 2, 3, 4

# The launch's numbers (float64): AMP's skip flag and 1/scale (already rounded to fp32), the clip
# factor, the lr (scheduled), and whether it came from memory (the rule then recomputes what the
# host computed from a number lr).
SKIP, INV_SCALE, CLIP, LR, DEVICE_LR = range(5)
# The launch's integers: which of the rule's state slots are present, the param rounding, whether
# the bucket has step counts (the launch adds the step to them) and per-tensor integers, and the
# stochastic rounding key.
PRESENT0, PRESENT1, PRESENT2, ROUNDING, COUNTS_STEPS, READS_EXTRA, SEED, COUNT = range(8)
NEAREST, STOCHASTIC, MASTER = 0, 1, 2

# error_model="numpy": IEEE division (x / 0 is inf or NaN, as in torch), no ZeroDivisionError branch in
# the loops, which would keep them from vectorizing
KERNEL_OPTIONS = dict(parallel=True, cache=True, fastmath=False, nogil=True, error_model="numpy")


# ---- memory: raw addresses as arrays, 16-bit floats as integers ----

@intrinsic
def address_as_pointer(typingctx, address, like):
    """The int64 `address` as a pointer to elements of `like`'s dtype."""
    pointer_type = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(address, like), codegen


@njit(error_model="numpy")
def tensor_array(address, numel, like):
    """The `numel` elements at `address`, typed as `like`'s."""
    return numba.carray(address_as_pointer(address, like), numel)


@intrinsic
def fused_multiply_add(typingctx, a, b, c):
    """a * b + c with one rounding (torch's CPU kernels use vec::fmadd here)."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, a, a), codegen


@intrinsic
def float32_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


@njit(error_model="numpy")
def bfloat16_to_float32(stored):
    return bits_float32(np.uint32(np.int64(stored) << 16))


@njit(error_model="numpy")
def float32_to_bfloat16(value):
    """Round to nearest even (torch's conversion); NaN stays NaN (the carry could flip it)."""
    bits = np.int64(float32_bits(value))
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.uint16(0x7FC0 if value != value else rounded)


@njit(error_model="numpy")
def float32_to_bfloat16_stochastic(value, random_bits):
    """Round up in magnitude with probability (dropped bits) / 2^16: unbiased."""
    bits = np.int64(float32_bits(value))
    rounded = (bits + (random_bits & 0xFFFF)) >> 16
    return np.uint16(0x7FC0 if value != value else rounded)


@njit(error_model="numpy")
def float16_to_float32(stored):
    """IEEE half (held as int16) to float32, exactly: normals and infinities by moving the fields,
    subnormals as mantissa * 2^-24."""
    half = np.int64(stored) & 0xFFFF
    sign = (half & 0x8000) << 16
    exponent = (half >> 10) & 0x1F
    mantissa = half & 0x3FF
    bits = sign | (((exponent + 112) << 23) if exponent != 31 else 0x7F800000) | (mantissa << 13)
    subnormal = np.float32(mantissa) * np.float32(2.0**-24)
    if sign:
        subnormal = -subnormal
    return subnormal if exponent == 0 else bits_float32(np.uint32(bits))


@njit(error_model="numpy")
def float32_to_float16(value):
    """float32 to IEEE half (as int16), rounded to nearest even as torch rounds: overflow to inf,
    NaN to the quiet NaN 0x7E00, subnormals rounded by a float addition that aligns them."""
    bits = np.int64(float32_bits(value))
    sign = bits & 0x80000000
    magnitude = bits ^ sign
    if magnitude >= 0x47800000:  # >= 65536: inf (or NaN)
        half = 0x7E00 if magnitude > 0x7F800000 else 0x7C00
    elif magnitude < 0x38800000:  # below the smallest normal half: 0.5 aligns the mantissa
        aligned = bits_float32(np.uint32(magnitude)) + np.float32(0.5)
        half = np.int64(float32_bits(aligned)) - 0x3F000000
    else:
        odd = (magnitude >> 13) & 1
        half = (magnitude + (((15 - 127) << 23) + 0xFFF) + odd) >> 13
    return np.int16(half | (sign >> 16))


def widen(values, index):
    """Element `index` of `values` in its compute type (fp64 for fp64, else fp32)."""


@overload(widen)
def _widen(values, index):
    if values.dtype == types.uint16:  # bf16
        return lambda values, index: bfloat16_to_float32(values[index])
    if values.dtype == types.int16:  # fp16
        return lambda values, index: float16_to_float32(values[index])
    return lambda values, index: values[index]


def store_nearest(values, index, value):
    """Store `value` at `index`, rounded to nearest in the array's dtype."""


@overload(store_nearest)
def _store_nearest(values, index, value):
    if values.dtype == types.uint16:
        def store(values, index, value):
            values[index] = float32_to_bfloat16(np.float32(value))
    elif values.dtype == types.int16:
        def store(values, index, value):
            values[index] = float32_to_float16(np.float32(value))
    elif values.dtype == types.float32:
        def store(values, index, value):
            values[index] = np.float32(value)
    else:
        def store(values, index, value):
            values[index] = value
    return store


def store_stochastic(values, index, value, random_bits):
    """Store a bf16 param rounded stochastically (other dtypes never ask: to nearest)."""


@overload(store_stochastic)
def _store_stochastic(values, index, value, random_bits):
    if values.dtype == types.uint16:
        def store(values, index, value, random_bits):
            values[index] = float32_to_bfloat16_stochastic(np.float32(value), random_bits)
    else:
        def store(values, index, value, random_bits):
            store_nearest(values, index, value)
    return store


def to_compute(value, like):
    """`value` in the compute type of tables of `like`'s dtype."""


@overload(to_compute)
def _to_compute(value, like):
    if like.dtype == types.float64:
        return lambda value, like: np.float64(value)
    return lambda value, like: np.float32(value)


# ---- counter-based random bits for stochastic rounding ----

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


@njit(error_model="numpy")
def mix64(z):
    """splitmix64's finalizer: every input bit flips each output bit with probability 1/2."""
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


@njit(error_model="numpy")
def rounding_stream(seed, count, tensor):
    """The start of a tensor's random sequence at a group step: a function of these alone."""
    return mix64(np.uint64(seed) ^ mix64(np.uint64(count) * GOLDEN + np.uint64(tensor)))


@njit(error_model="numpy")
def random_bits16(stream, element):
    """16 random bits for an element: splitmix64's output at position `element` of the stream,
    the same whichever thread computes it."""
    return np.int64(mix64(stream + np.uint64(element) * GOLDEN) >> np.uint64(48))


# ---- small pieces of arithmetic, as torch's CPU kernels write them ----

@njit(error_model="numpy")
def lerp(start, end, weight):
    """torch's lerp: start + weight (end - start), fused, from the nearer end."""
    if abs(weight) < 0.5:
        return fused_multiply_add(weight, end - start, start)
    return fused_multiply_add(weight - type(weight)(1), end - start, end)


@njit(error_model="numpy")
def nan_maximum(a, b):
    """max(a, b), NaN where either is NaN (torch.maximum)."""
    return a if (a != a or a > b) else b


# ---- the shared walks ----

@njit(inline="always", error_model="numpy")
def walk_block(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream,
               P0, P1, P2, ROUNDING_MODE):
    """Load param, grad and the present states of the `count` elements of a block (arrays from
    its first element, `start` in its tensor), apply the rule, store them back. P0..P2 (state slots present) and ROUNDING_MODE are constants at each call site."""
    state0, state1, state2 = states
    for index in range(count):
        if ROUNDING_MODE == MASTER:
            p = to_compute(master[index], param)
        else:
            p = widen(param, index)
        g = widen(grad, index) * inv_scale * clip  # unscale, then clip: unscale_ then clip_grad_norm_
        s0 = widen(state0, index) if P0 else g  # an absent state is not read by the rule
        s1 = widen(state1, index) if P1 else g
        s2 = widen(state2, index) if P2 else g
        p, s0, s1, s2 = element(p, g, s0, s1, s2, coefs, P0, P1, P2)
        if ROUNDING_MODE == MASTER:
            master[index] = np.float32(p)
            store_nearest(param, index, p)
        elif ROUNDING_MODE == STOCHASTIC:
            store_stochastic(param, index, p, random_bits16(stream, start + index))
        else:
            store_nearest(param, index, p)
        if P0:
            store_nearest(state0, index, s0)
        if P1:
            store_nearest(state1, index, s1)
        if P2:
            store_nearest(state2, index, s2)


@njit(inline="always", error_model="numpy")
def walk_rounded(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                 P0, P1, P2):
    """walk_block with the param rounding as a constant."""
    if rounding == MASTER:
        walk_block(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, P0, P1, P2,
                   MASTER)
    elif rounding == STOCHASTIC:
        walk_block(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, P0, P1, P2,
                   STOCHASTIC)
    else:
        walk_block(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, P0, P1, P2,
                   NEAREST)


@njit(inline="always", error_model="numpy")  # the prange must sit in the parallel kernel itself
def run_blocks(walk, element, block_scalars, table, blocks, block, like, master_like, steps, numbers, scalars, flags):
    """One parallel pass over the blocks (owner, start) of `blocks`: per block, the tensor's
    arrays from the table, the rule's numbers, and the walk over its elements."""
    if numbers[SKIP] != 0:  # AMP found an inf or NaN: nothing is written, the step does not count
        return
    present0, present1, present2 = flags[PRESENT0] != 0, flags[PRESENT1] != 0, flags[PRESENT2] != 0
    rounding, counts_steps, reads_extra = flags[ROUNDING], flags[COUNTS_STEPS] != 0, flags[READS_EXTRA] != 0
    if counts_steps:  # torch.optim's step += 1, in the counts' own dtype, before the update reads them
        for tensor in range(steps.shape[0]):
            steps[tensor] += 1
    seed, group_step = flags[SEED], flags[COUNT]
    inv_scale, clip = to_compute(numbers[INV_SCALE], like), to_compute(numbers[CLIP], like)
    lr, device_lr = numbers[LR], numbers[DEVICE_LR] != 0
    for block_index in prange(blocks.shape[1]):
        tensor = blocks[0, block_index]
        start = blocks[1, block_index]
        count = min(block, table[NUMEL_ROW, tensor] - start)
        # arrays of the block's elements alone: indices from 0 let the loops vectorize
        offset = start * like.itemsize
        param = tensor_array(table[PARAM_ROW, tensor] + offset, count, like)
        grad = tensor_array(table[GRAD_ROW, tensor] + offset, count, like)
        row = FIRST_STATE_ROW  # the present states' rows follow param and grad, in slot order
        state0 = state1 = state2 = param  # placeholders for absent slots: never touched
        if present0:
            state0 = tensor_array(table[row, tensor] + offset, count, like)
            row += 1
        if present1:
            state1 = tensor_array(table[row, tensor] + offset, count, like)
            row += 1
        if present2:
            state2 = tensor_array(table[row, tensor] + offset, count, like)
            row += 1
        if rounding == MASTER:
            master = tensor_array(table[row, tensor] + start * master_like.itemsize, count, master_like)
        else:
            master = tensor_array(table[PARAM_ROW, tensor], 0, master_like)
        step = np.float64(steps[tensor]) if counts_steps else 0.0
        extra = table[EXTRA_ROW, tensor] if reads_extra else 0
        coefs = block_scalars(lr, step, extra, scalars, device_lr, like)
        stream = rounding_stream(seed, group_step, tensor)
        walk(element, coefs, param, master, grad, (state0, state1, state2), start, count, inv_scale, clip, stream,
             rounding, present0, present1, present2)


# ---- SGD ----

@njit(error_model="numpy")
def sgd_block_scalars(lr, step, extra, scalars, device_lr, like):
    """The lr, and buf = decay * buf + share * g: mu and 1 - dampening, or 0 and 1 for a buffer
    that starts at this step (it holds zeros, so it takes the grad exactly)."""
    weight_decay, momentum, one_minus_dampening, nesterov, grad_sign = scalars[0], scalars[1], scalars[2], \
        scalars[3], scalars[4]
    buffer_decay, grad_share = (0.0, 1.0) if extra != 0 else (momentum, one_minus_dampening)
    c = to_compute
    return (c(lr, like), c(weight_decay, like), c(momentum, like), nesterov != 0, c(grad_sign, like),
            c(buffer_decay, like), c(grad_share, like))


@njit(error_model="numpy")
def sgd_element(p, g, buf, unused1, unused2, coefs, MOMENTUM, P1, P2):
    """buf = g on the first step, else mu buf + (1 - dampening) g; d = g + mu buf (Nesterov) or
    buf; p -= lr d (without momentum: p -= lr g)."""
    lr, weight_decay, momentum, nesterov, grad_sign, buffer_decay, grad_share = coefs
    g = g * grad_sign
    if weight_decay != 0:
        g = g + p * weight_decay
    if MOMENTUM:
        buf = buf * buffer_decay + g * grad_share
        g = g + buf * momentum if nesterov else buf
    return p - lr * g, buf, unused1, unused2


@njit(inline="always", error_model="numpy")
def sgd_walk(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
             present0, present1, present2):
    """State presence: the momentum buffer, with momentum."""
    if present0:
        walk_rounded(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                     True, False, False)
    else:
        walk_rounded(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                     False, False, False)


@njit(**KERNEL_OPTIONS)
def sgd_kernel(table, blocks, block, like, master_like, steps, numbers, scalars, flags):
    run_blocks(sgd_walk, sgd_element, sgd_block_scalars, table, blocks, block, like, master_like, steps, numbers,
               scalars, flags)


# ---- Adam / AdamW ----

@njit(error_model="numpy")
def adam_block_scalars(lr, step, extra, scalars, device_lr, like):
    """The bias corrections lr / (1 - b1^step) and sqrt(1 - b2^step) in fp64; AdamW's 1 - lr * wd
    from the lr read from memory (else the host's)."""
    (one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, decoupled_weight_decay, param_scale,
     grad_sign, log2_beta1, log2_beta2) = (scalars[0], scalars[1], scalars[2], scalars[3], scalars[4], scalars[5],
                                           scalars[6], scalars[7], scalars[8], scalars[9])
    step_size = lr / (1 - np.exp2(step * log2_beta1))
    bias_correction2_sqrt = np.sqrt(1 - np.exp2(step * log2_beta2))
    if device_lr:
        param_scale = 1 - lr * decoupled_weight_decay
    c = to_compute
    return (c(one_minus_beta1, like), c(beta2, like), c(one_minus_beta2, like), c(eps, like),
            c(coupled_weight_decay, like), c(param_scale, like), c(grad_sign, like), c(step_size, like),
            c(bias_correction2_sqrt, like))


@njit(error_model="numpy")
def adam_element(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, coefs, P0, P1, AMSGRAD):
    """m = lerp(m, g, 1-b1);  v = b2 v + (1-b2) g^2;  p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps),
    in the order of torch's CPU fused Adam."""
    (one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, param_scale, grad_sign, step_size,
     bias_correction2_sqrt) = coefs
    g = g * grad_sign
    if coupled_weight_decay != 0:
        g = g + p * coupled_weight_decay
    if param_scale != 1:  # AdamW: p *= 1 - lr * wd
        p = p * param_scale
    exp_avg = lerp(exp_avg, g, one_minus_beta1)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        max_exp_avg_sq = nan_maximum(max_exp_avg_sq, exp_avg_sq)
        denom = np.sqrt(max_exp_avg_sq) / bias_correction2_sqrt + eps
    else:
        denom = np.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    return p - step_size * exp_avg / denom, exp_avg, exp_avg_sq, max_exp_avg_sq


@njit(inline="always", error_model="numpy")
def adam_walk(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
              present0, present1, present2):
    """State presence: max_exp_avg_sq with amsgrad."""
    if present2:
        walk_rounded(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                     True, True, True)
    else:
        walk_rounded(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                     True, True, False)


@njit(**KERNEL_OPTIONS)
def adam_kernel(table, blocks, block, like, master_like, steps, numbers, scalars, flags):
    run_blocks(adam_walk, adam_element, adam_block_scalars, table, blocks, block, like, master_like, steps, numbers,
               scalars, flags)


# ---- Adagrad ----

@njit(error_model="numpy")
def adagrad_block_scalars(lr, step, extra, scalars, device_lr, like):
    """The decayed lr, lr / (1 + (step - 1) lr_decay), in fp64."""
    lr_decay, weight_decay, eps, grad_sign = scalars[0], scalars[1], scalars[2], scalars[3]
    c = to_compute
    return c(lr / (1 + (step - 1) * lr_decay), like), c(weight_decay, like), c(eps, like), c(grad_sign, like)


@njit(error_model="numpy")
def adagrad_element(p, g, state_sum, unused1, unused2, coefs, P0, P1, P2):
    """sum += g^2;  p -= clr * g / (sqrt(sum) + eps)."""
    clr, weight_decay, eps, grad_sign = coefs
    g = g * grad_sign
    if weight_decay != 0:
        g = g + p * weight_decay
    state_sum = state_sum + g * g
    return p - clr * (g / (np.sqrt(state_sum) + eps)), state_sum, unused1, unused2


@njit(inline="always", error_model="numpy")
def adagrad_walk(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                 present0, present1, present2):
    walk_rounded(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                 True, False, False)


@njit(**KERNEL_OPTIONS)
def adagrad_kernel(table, blocks, block, like, master_like, steps, numbers, scalars, flags):
    run_blocks(adagrad_walk, adagrad_element, adagrad_block_scalars, table, blocks, block, like, master_like, steps,
               numbers, scalars, flags)


# ---- RMSprop ----

@njit(error_model="numpy")
def rmsprop_block_scalars(lr, step, extra, scalars, device_lr, like):
    alpha, one_minus_alpha, eps, weight_decay, momentum, grad_sign = (scalars[0], scalars[1], scalars[2],
                                                                     scalars[3], scalars[4], scalars[5])
    c = to_compute
    return (c(lr, like), c(alpha, like), c(one_minus_alpha, like), c(eps, like), c(weight_decay, like),
            c(momentum, like), c(grad_sign, like))


@njit(error_model="numpy")
def rmsprop_element(p, g, square_avg, momentum_buffer, grad_avg, coefs, P0, MOMENTUM, CENTERED):
    """sq = a sq + (1-a) g^2;  avg = sqrt(sq - gavg^2 if centered else sq) + eps;
    buf = mu buf + g / avg, p -= lr buf  (without momentum: p -= lr g / avg)."""
    lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_sign = coefs
    g = g * grad_sign
    if weight_decay != 0:
        g = g + p * weight_decay
    square_avg = square_avg * alpha + one_minus_alpha * g * g
    if CENTERED:
        grad_avg = lerp(grad_avg, g, one_minus_alpha)
        # one rounding, as torch's addcmul(grad_avg, grad_avg, value=-1) (sq - gavg^2 cancels)
        avg = np.sqrt(fused_multiply_add(-grad_avg, grad_avg, square_avg)) + eps
    else:
        avg = np.sqrt(square_avg) + eps
    if MOMENTUM:
        momentum_buffer = momentum_buffer * momentum + g / avg
        p = p - lr * momentum_buffer
    else:
        p = p - lr * (g / avg)
    return p, square_avg, momentum_buffer, grad_avg


@njit(inline="always", error_model="numpy")
def rmsprop_walk(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                 present0, present1, present2):
    """State presence: momentum_buffer with momentum, grad_avg when centered."""
    if present1 and present2:
        walk_rounded(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                     True, True, True)
    elif present1:
        walk_rounded(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                     True, True, False)
    elif present2:
        walk_rounded(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                     True, False, True)
    else:
        walk_rounded(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                     True, False, False)


@njit(**KERNEL_OPTIONS)
def rmsprop_kernel(table, blocks, block, like, master_like, steps, numbers, scalars, flags):
    run_blocks(rmsprop_walk, rmsprop_element, rmsprop_block_scalars, table, blocks, block, like, master_like, steps,
               numbers, scalars, flags)


# ---- RAdam ----

@njit(error_model="numpy")
def radam_block_scalars(lr, step, extra, scalars, device_lr, like):
    """In fp64: rho_t = rho_inf - 2 t b2^t / (1 - b2^t), and the step size lr / (1 - b1^t), times
    the rectification r_t sqrt(1 - b2^t) where rho_t > 5; the decoupled 1 - lr * wd from the lr
    read from memory (else the host's)."""
    (one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, decoupled_weight_decay, param_scale,
     grad_sign, log2_beta1, log2_beta2, rho_inf) = (scalars[0], scalars[1], scalars[2], scalars[3], scalars[4],
                                                    scalars[5], scalars[6], scalars[7], scalars[8], scalars[9],
                                                    scalars[10])
    beta2_power = np.exp2(step * log2_beta2)
    bias_correction2 = 1 - beta2_power
    rho_t = rho_inf - 2 * step * beta2_power / bias_correction2
    rectified = rho_t > 5
    step_size = lr / (1 - np.exp2(step * log2_beta1))
    if rectified:
        rect = np.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        step_size = step_size * rect * np.sqrt(bias_correction2)
    if device_lr:
        param_scale = 1 - lr * decoupled_weight_decay
    c = to_compute
    return (c(one_minus_beta1, like), c(beta2, like), c(one_minus_beta2, like), c(eps, like),
            c(coupled_weight_decay, like), c(param_scale, like), c(grad_sign, like), c(step_size, like), rectified)


@njit(error_model="numpy")
def radam_element(p, g, exp_avg, exp_avg_sq, unused, coefs, P0, P1, P2):
    """m = lerp(m, g, 1-b1);  v = b2 v + (1-b2) g^2;  p -= step_size * m / (sqrt(v) + eps) where
    the variance is tractable, else p -= step_size * m."""
    (one_minus_beta1, beta2, one_minus_beta2, eps, coupled_weight_decay, param_scale, grad_sign, step_size,
     rectified) = coefs
    g = g * grad_sign
    if coupled_weight_decay != 0:
        g = g + p * coupled_weight_decay
    if param_scale != 1:  # decoupled weight decay: p *= 1 - lr * wd
        p = p * param_scale
    exp_avg = lerp(exp_avg, g, one_minus_beta1)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g
    if rectified:
        p = p - step_size * (exp_avg / (np.sqrt(exp_avg_sq) + eps))
    else:
        p = p - step_size * exp_avg
    return p, exp_avg, exp_avg_sq, unused


@njit(inline="always", error_model="numpy")
def radam_walk(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
               present0, present1, present2):
    walk_rounded(element, coefs, param, master, grad, states, start, count, inv_scale, clip, stream, rounding,
                 True, True, False)


@njit(**KERNEL_OPTIONS)
def radam_kernel(table, blocks, block, like, master_like, steps, numbers, scalars, flags):
    run_blocks(radam_walk, radam_element, radam_block_scalars, table, blocks, block, like, master_like, steps,
               numbers, scalars, flags)
