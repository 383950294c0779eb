"""The benchmark scripts run (tiny sizes): they must not rot between measurements."""

import pathlib
import sys

from kernels_pallas.sinkhorn import bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import bench_train_step  # noqa: E402


def test_sinkhorn_benchmark_tables(capsys):
  bench.main(["--tokens", "256", "--repeats", "1"])
  bench.main(["--sweep", "--min_log2", "8", "--max_log2", "8", "--repeats", "1"])
  out = capsys.readouterr().out
  assert "| custom VJP (XLA) |" in out and "| 2^8 | autodiff of loop |" in out
  assert out.count("interpret mode, 1000 tokens") == 2


def test_train_step_benchmark_table(capsys):
  bench_train_step.main(["--d_model", "16", "--layers", "1", "--heads", "2", "--mlp_dim", "32",
                         "--seq", "8", "--batch", "2", "--steps", "1",
                         "--variants", "prenorm,mhc"])
  out = capsys.readouterr().out
  assert "| prenorm " in out and "| mhc " in out and "1.00x" in out
