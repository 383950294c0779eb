"""The benchmark scripts run (tiny sizes): they must not rot between measurements."""

from experiments import bench_site_memory, bench_train_step
from kernels_pallas.sinkhorn import bench


def test_sinkhorn_benchmark_tables(capsys):
  bench.main(["--tokens", "256", "--repeats", "1"])
  bench.main(["--sweep", "--min_log2", "8", "--max_log2", "8", "--repeats", "1"])
  out = capsys.readouterr().out
  # The kernels' interpret-mode check is `--validate`, tested in test_sinkhorn_pallas.py.
  assert "| custom VJP (XLA) |" in out and "| 2^8 | autodiff of loop |" in out
  assert "| 2^8 | custom VJP (XLA) |" in out


def test_train_step_benchmark_table(capsys):
  bench_train_step.main(["--d_model", "16", "--layers", "1", "--heads", "2", "--mlp_dim", "32",
                         "--seq", "8", "--batch", "2", "--steps", "1",
                         "--variants", "prenorm,mhc"])
  out = capsys.readouterr().out
  assert "| prenorm " in out and "| mhc " in out and "1.00x" in out


def test_site_memory_benchmark_table(capsys):
  bench_site_memory.main(["--batch", "2", "--seq", "8", "--n", "2", "--dim", "16",
                          "--layers", "1"])
  out = capsys.readouterr().out
  assert "MaxText formulation = library site to 1e-5" in out
  paths = (bench_site_memory.MAXTEXT, bench_site_memory.AUTODIFF, "custom VJP (library)")
  for branch in bench_site_memory.BRANCHES:
    rows = [next(line for line in out.splitlines() if line.startswith(f"| mHC | {branch} | {p} |"))
            for p in paths]
    assert f"| HC dynamic | {branch} | library |" in out
    # Columns: ... | saved MiB | stream arrays | vs autodiff | vs MaxText formulation | ...
    vs_maxtext = [float(row.split("|")[7].strip().rstrip("x")) for row in rows]
    assert vs_maxtext[0] == 1.0 and vs_maxtext[2] < vs_maxtext[1] < 1.0
