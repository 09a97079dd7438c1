"""Training loops that unscale before the step: GradScaler's unscale_, clip_grad_norm_, step and
update (the sequence Lightning and accelerate run for fp16 AMP with gradient clipping), and
Lightning's Trainer itself. With ``unscale_in_step=False`` fusedopt lets the scaler unscale, as
torch.optim does; by default (like torch's fused optimizers) the step unscales inside the kernels,
and a scaler that has unscaled already hands over no scale."""
import warnings

import pytest
import torch

import fusedopt
from helpers import OPTIMIZERS, RULES, STATEFUL, regression_batches, regression_model, skip_where_compared_with_itself

BACKENDS = ["torch", "triton", "numba"]
MAX_NORM = 0.5


def options(rule):
    return dict(STATEFUL[rule], lr=0.01, weight_decay=0.1)


def scaler_run(make_optimizer):
    """Five AMP steps with clipping; the third one's grads hold an inf (the scaler skips it)."""
    model = regression_model()
    optimizer = make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for index, (x, y) in enumerate(regression_batches(5)):
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if index == 2:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], scaler.get_scale()


@pytest.mark.parametrize("unscale_in_step", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULES)
def test_scaler_unscale_clip_step_update_matches_torch(rule, backend, unscale_in_step):
    skip_where_compared_with_itself(rule, backend)
    fused, reference = OPTIMIZERS[rule]
    ours, our_scale = scaler_run(lambda p: fused(p, backend=backend, unscale_in_step=unscale_in_step, **options(rule)))
    theirs, their_scale = scaler_run(lambda p: reference(p, **options(rule)))
    assert our_scale == their_scale
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_unscale_in_step_decides_what_the_scaler_sees():
    param = [torch.nn.Parameter(torch.ones(2))]
    assert fusedopt.AdamW(param)._step_supports_amp_scaling
    optimizer = fusedopt.AdamW(param, unscale_in_step=False)
    assert not optimizer._step_supports_amp_scaling
    optimizer.unscale_in_step = True  # the one-line switch, on an optimizer built elsewhere
    assert optimizer._step_supports_amp_scaling
    with pytest.raises(TypeError):
        fusedopt.AdamW(param, unscale_in_step="no")


# ---- Lightning ----


def lightning_run(make_optimizer, precision):
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = regression_model()

        def training_step(self, batch, index):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x).float(), y)

        def configure_optimizers(self):
            return make_optimizer(self.parameters())

    x, y = zip(*regression_batches(4))
    data = torch.utils.data.TensorDataset(torch.cat(x), torch.cat(y))
    module = Module()
    trainer = lightning.Trainer(accelerator="cpu", devices=1, precision=precision, gradient_clip_val=MAX_NORM,
                                max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and loggers
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return [p.detach().clone() for p in module.parameters()]


# Lightning runs "16-mixed" as bf16-mixed on the CPU (no scaler; the test above has the scaler's
# sequence), but refuses clipping alike for an optimizer that unscales in its step.
MIXED = "16-mixed" if torch.cuda.is_available() else "bf16-mixed"


@pytest.mark.parametrize("rule", RULES)
def test_lightning_mixed_precision_with_gradient_clipping_matches_torch(rule):
    fused, reference = OPTIMIZERS[rule]
    ours = lightning_run(lambda p: fused(p, unscale_in_step=False, **options(rule)), MIXED)
    theirs = lightning_run(lambda p: reference(p, **options(rule)), MIXED)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lightning_refuses_clipping_by_default_as_for_torchs_fused_optimizers():
    with pytest.raises(RuntimeError, match="performs unscaling of gradients internally"):
        lightning_run(lambda p: fusedopt.AdamW(p, lr=0.01), MIXED)
    with pytest.raises(RuntimeError, match="performs unscaling of gradients internally"):
        lightning_run(lambda p: torch.optim.AdamW(p, lr=0.01, fused=True), MIXED)
