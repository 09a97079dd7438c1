"""Whether numba's threads slow torch's own: a 2M-element torch multiply timed alone, and right after
a numba CPU kernel step, under each numba threading layer (one process per layer).

    python -m bench.cpu_threads
"""
import subprocess
import sys

PROBE = r"""
import statistics, sys, time, torch, numba
layer = sys.argv[1]
if layer != "fusedopt":
    numba.config.THREADING_LAYER = layer
import fusedopt
x = torch.randn(2_000_000)
p = [torch.randn(4096, requires_grad=True) for _ in range(200)]
for t in p: t.grad = torch.randn(4096)
opt = fusedopt.Adam(p, backend="numba")
opt.step()
def mul_ms(before=None):
    times = []
    for _ in range(31):
        if before: before()
        start = time.perf_counter(); torch.mul(x, 1.0001, out=x); times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
alone = mul_ms()
after = mul_ms(opt.step)
print(f"{numba.threading_layer()} {alone:.3f} {after:.3f}")
"""


def main():
    print("| numba layer | torch mul alone ms | torch mul right after a numba step ms |")
    print("|---|---|---|")
    for layer in ("fusedopt", "omp", "workqueue", "tbb"):
        out = subprocess.run([sys.executable, "-c", PROBE, layer], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {layer} | unavailable: {out.stderr.strip().splitlines()[-1][:80]} | |")
            continue
        name, alone, after = out.stdout.split()[-3:]
        label = f"{name} (fusedopt's choice)" if layer == "fusedopt" else name
        print(f"| {label} | {alone} | {after} |")


if __name__ == "__main__":
    main()
