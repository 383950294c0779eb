"""The benchmark scripts run (tiny sizes): they must not rot between measurements."""

from kernels_pallas.sinkhorn import bench


def test_sinkhorn_benchmark_tables(capsys):
  bench.main(["--tokens", "256", "--repeats", "1"])
  bench.main(["--sweep", "--min_log2", "8", "--max_log2", "8", "--repeats", "1"])
  out = capsys.readouterr().out
  assert "| custom VJP (XLA) |" in out and "| 2^8 | autodiff of loop |" in out
  assert out.count("interpret mode, 1000 tokens") == 2
