"""Adam and AdamW: the per-element update rule and the kernel that applies it to a tensor table."""
import triton
import triton.language as tl

from .multi_tensor import load_block, locate_block, store_block, tensor_extra, tensor_pointer


@triton.jit
def adam_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2, eps,
                weight_decay, decoupled, grad_sign, step_size, bias_correction2_sqrt, AMSGRAD: tl.constexpr):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)."""
    grad = grad * grad_sign
    if weight_decay != 0:
        if decoupled:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = exp_avg + (1 - beta1) * (grad - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    if AMSGRAD:
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq)
        denom = tl.sqrt(max_exp_avg_sq) / bias_correction2_sqrt + eps
    else:
        denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    param = param - step_size * (exp_avg / denom)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


@triton.jit
def adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, numel,
               lr, beta1, beta2, eps, weight_decay, decoupled, grad_sign, step_size,
               bias_correction2_sqrt, AMSGRAD: tl.constexpr, FULL: tl.constexpr):
    param = load_block(param_ptr, offsets, numel, FULL)
    grad = load_block(grad_ptr, offsets, numel, FULL)
    exp_avg = load_block(exp_avg_ptr, offsets, numel, FULL)
    exp_avg_sq = load_block(exp_avg_sq_ptr, offsets, numel, FULL)
    max_exp_avg_sq = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = load_block(max_exp_avg_sq_ptr, offsets, numel, FULL)
    param, exp_avg, exp_avg_sq, max_exp_avg_sq = adam_update(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
        decoupled, grad_sign, step_size, bias_correction2_sqrt, AMSGRAD)
    store_block(param_ptr, offsets, numel, param, FULL)
    store_block(exp_avg_ptr, offsets, numel, exp_avg, FULL)
    store_block(exp_avg_sq_ptr, offsets, numel, exp_avg_sq, FULL)
    if AMSGRAD:
        store_block(max_exp_avg_sq_ptr, offsets, numel, max_exp_avg_sq, FULL)


@triton.jit(do_not_specialize=["num_tensors", "num_blocks", "step"])
def adam_kernel(
    tensor_table,  # int64 [roles + 2, num_tensors]: sizes, step offsets, addresses
    block_table,  # int64 [2, num_blocks]: owning tensor and first element of each block
    num_tensors, num_blocks,
    lr, beta1, beta2, eps, weight_decay,
    decoupled,  # 1.0: AdamW's decay of the param, 0.0: L2 penalty added to the grad
    grad_sign,  # -1 to maximize
    step,  # the step count of tensors whose step offset is 0
    step_size, bias_correction2_sqrt,  # lr / (1 - b1^step) and sqrt(1 - b2^step), from the host
    AMSGRAD: tl.constexpr,
    PER_TENSOR_STEP: tl.constexpr,  # some tensors' steps differ: bias corrections from the table
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    tensor, offsets, numel, full = locate_block(tensor_table, block_table, num_blocks, BLOCK, ALIGNED)
    param_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 0, DTYPE, ALIGNED)
    grad_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 1, DTYPE, ALIGNED)
    exp_avg_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 2, DTYPE, ALIGNED)
    exp_avg_sq_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 3, DTYPE, ALIGNED)
    max_exp_avg_sq_ptr = exp_avg_sq_ptr
    if AMSGRAD:
        max_exp_avg_sq_ptr = tensor_pointer(tensor_table, num_tensors, tensor, 4, DTYPE, ALIGNED)
    if PER_TENSOR_STEP:
        own_step = step + tensor_extra(tensor_table, num_tensors, tensor).to(tl.float32)
        step_size = lr / (1 - tl.exp2(own_step * tl.log2(beta1)))
        bias_correction2_sqrt = tl.sqrt(1 - tl.exp2(own_step * tl.log2(beta2)))
    if full:
        adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, numel,
                   lr, beta1, beta2, eps, weight_decay, decoupled, grad_sign, step_size,
                   bias_correction2_sqrt, AMSGRAD, True)
    else:
        adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, offsets, numel,
                   lr, beta1, beta2, eps, weight_decay, decoupled, grad_sign, step_size,
                   bias_correction2_sqrt, AMSGRAD, False)


def adam(table, *, step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
         per_tensor_step=False):
    """One Adam/AdamW step over a TensorTable whose roles are param, grad, exp_avg, exp_avg_sq
    [, max_exp_avg_sq]. `step` is the new step count; with per_tensor_step the table's extra row
    holds each tensor's offset from it."""
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    table.launch(
        adam_kernel,
        lr, beta1, beta2, eps, weight_decay, float(decoupled_weight_decay), -1.0 if maximize else 1.0,
        float(step), step_size, bias_correction2_sqrt,
        AMSGRAD=amsgrad, PER_TENSOR_STEP=per_tensor_step,
    )
