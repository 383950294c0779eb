"""The benchmark scripts run (tiny sizes): they must not rot between measurements."""

import os
import re

import pytest

from experiments import bench_decode, bench_processes, bench_site_memory, bench_train_step
from experiments.bench_progress import RowProgress
from kernels_pallas.sinkhorn import bench


def test_sinkhorn_benchmark_tables(capsys):
  bench.main(["--tokens", "256", "--repeats", "1"])
  bench.main(["--sweep", "--min_log2", "8", "--max_log2", "8", "--repeats", "1"])
  out = capsys.readouterr().out
  # The kernels' interpret-mode check is `--validate`, tested in test_sinkhorn_pallas.py.
  assert "| custom VJP (XLA) |" in out and "| 2^8 | autodiff of loop |" in out
  assert "| 2^8 | custom VJP (XLA) |" in out


def table_rows(out: str) -> dict[tuple[str, str], list[str]]:
  """A printed markdown table's body rows by their first two cells."""
  rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines()
          if line.startswith("| ") and not line.startswith("| variant")]
  return {(row[0], row[1]): row[2:] for row in rows}


def test_train_step_benchmark_prints_each_row_when_measured_with_paired_ratios(capsys,
                                                                               monkeypatch):
  # Real steps run, but each reports a fixed time, so the arithmetic can be checked exactly:
  # prenorm 10 ms, mhc 15 ms. mhc's steps must see prenorm's row already printed.
  printed = []
  real_step = bench_train_step.timed_step

  def fixed_time_step(run):
    real_step(run)
    printed.append(capsys.readouterr())
    residual = run["trainer"].model_config.residual
    if residual == "mhc":
      assert ("prenorm", "none") in table_rows("".join(p.out for p in printed))
    return {"prenorm": 0.010, "mhc": 0.015}[residual]

  monkeypatch.setattr(bench_train_step, "timed_step", fixed_time_step)
  bench_train_step.main(["--d_model", "16", "--layers", "1", "--heads", "2", "--mlp_dim", "32",
                         "--seq", "8", "--batch", "2", "--steps", "2",
                         "--variants", "prenorm,mhc"])
  printed.append(capsys.readouterr())
  out, err = "".join(p.out for p in printed), "".join(p.err for p in printed)
  rows = table_rows(out)
  assert list(rows) == [("prenorm", "none"), ("mhc", "none")]
  # Columns: params | step ms | prenorm ms | vs prenorm | overhead | temp MiB | vs prenorm
  assert rows["prenorm", "none"][1:5] == ["10.0", "10.0", "1.00x", "0.0%"]
  assert rows["mhc", "none"][1:5] == ["15.0", "10.0", "1.50x", "50.0%"]
  assert int(rows["mhc", "none"][0].replace(",", "")) > int(
      rows["prenorm", "none"][0].replace(",", ""))
  progress = err.splitlines()
  assert progress[0].startswith("2 rows (each built, compiled, warmed up and timed for 2 steps")
  assert progress[1].startswith("[1/2] prenorm none took ") and "estimated total" in progress[1]
  assert progress[2].startswith("[2/2] mhc none took ") and "all done in" in progress[2]


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


def test_row_progress_estimates_the_total_after_the_first_row_then_the_time_left(capsys):
  now = iter([100.0, 160.0, 250.0, 280.0, 400.0])  # start, then the end of each row
  progress = RowProgress(4, "each compiled and timed", clock=lambda: next(now))
  for label in ("prenorm", "hc", "mhc", "mhc_lite"):
    progress.row_done(label)
  captured = capsys.readouterr()
  assert captured.out == ""  # the tables own stdout
  assert captured.err.splitlines() == [
      "4 rows (each compiled and timed); the time they take is estimated after the first",
      "[1/4] prenorm took 1m00s; estimated total 4m00s",
      "[2/4] hc took 1m30s; about 2m30s left",  # 75 s a row so far
      "[3/4] mhc took 30s; about 1m00s left",
      "[4/4] mhc_lite took 2m00s; all done in 5m00s"]


def test_decode_benchmark_compares_the_cache_with_recomputation_on_the_same_tokens(capsys):
  bench_decode.main(["--variants", "prenorm,hc", "--batch", "2", "--prompt", "5", "--new", "4",
                     "--d_model", "64", "--layers", "1", "--repeats", "1"])
  rows = [[cell.strip() for cell in line.split("|")[1:-1]]
          for line in capsys.readouterr().out.splitlines() if line.startswith(("| prenorm", "| hc"))]
  assert [row[0] for row in rows] == ["prenorm", "hc"]
  assert all(row[4] == "yes" for row in rows)  # greedy with the cache = the recomputation
  assert rows[0][6] == "1.00x"


def test_process_benchmark_runs_both_ways_pinned_and_prints_their_ratio(capsys):
  tiny = ["ModelConfig.d_model = 16", "ModelConfig.num_layers = 1", "ModelConfig.mlp_dim = 32",
          "DataConfig.seq_len = 16", "DataConfig.batch_size = 2"]
  assert bench_processes.main(["--steps", "2", "--arm", "hc(num_streams=2)",
                               *[a for p in tiny for a in ("--gin_param", p)]]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("Train steps of the cpu preset's hc(num_streams=2) (")
  one = float(re.fullmatch(r"\(a\) one process on both cores, 2 runs one after another: "
                           r"([\d.]+) steps/s", lines[1]).group(1))
  cores = sorted(os.sched_getaffinity(0))[:2]
  each = "(.+) on core\\(s\\) {}, (.+) on core\\(s\\) {}".format(*cores)
  two = float(re.fullmatch(r"\(b\) two processes of one core each, 2 runs at once: ([\d.]+) "
                           rf"steps/s in all \({each}\)", lines[2]).group(1))
  ratio = float(re.fullmatch(r"\(b\) / \(a\): ([\d.]+)x the total throughput",
                             lines[3]).group(1))
  assert ratio == pytest.approx(two / one, abs=0.01)  # to the printed digits


def test_process_benchmark_refuses_a_bad_arm_in_one_line_before_it_runs(capsys):
  assert bench_processes.main(["--arm", "hc(dynamc=False)"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err == ("bench_processes: ValueError: arm 'hc(dynamc=False)': no setting "
                          "'dynamc'; hc's settings: num_streams: int, dynamic: bool, "
                          "num_fracs: int\n")


def test_tunix_grpo_benchmark_prints_each_variants_throughput_against_prenorm(capsys):
  pytest.importorskip("tunix")
  from experiments import bench_grpo
  assert bench_grpo.main(["--variants", "prenorm,mhc", "--steps", "3", "--d_model", "32",
                          "--layers", "1", "--group_size", "2", "--prompts_per_step", "2"]) == 0
  rows = [[cell.strip() for cell in line.split("|")[1:-1]]
          for line in capsys.readouterr().out.splitlines() if line.startswith(("| prenorm",
                                                                               "| mhc"))]
  assert [row[0] for row in rows] == ["prenorm", "mhc"]
  assert rows[0][3:] == ["1.00x", "1.00x"]
  tokens_per_sec, ratio = float(rows[1][1]), float(rows[1][3].removesuffix("x"))
  assert tokens_per_sec > 0 and ratio == pytest.approx(tokens_per_sec / float(rows[0][1]),
                                                        abs=0.02)
