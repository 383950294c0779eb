"""`train(..., init_from=DIR)` / `mhc-train --init_from DIR`: a run starts from a workdir of
this project or a Hugging Face folder, as it is or retrofitted, records where it started,
resumes from its own checkpoint, and refuses what does not fit in one line before it writes."""

import contextlib
import dataclasses
import io
import json
import pathlib
import re
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mhc_jax.lm import cli as cli_lib
from mhc_jax.lm.data import DataConfig
from mhc_jax.lm.model import SITES, ModelConfig, Transformer
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.pretrained import difference, load_params
from mhc_jax.lm.residuals import with_residual
from mhc_jax.lm.retrofitting import RETROFIT_RESIDUALS
from mhc_jax.lm.train import LoopConfig, train

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
# remat off: it only costs compile time here.
TINY = ModelConfig(d_model=32, num_layers=2, num_heads=4, mlp_dim=64, remat="none")


def run(workdir, corpus, *, steps, model=TINY, init_from=None, checkpoint_every=1000):
  """A few steps on one device; warm-up makes step 1's learning rate 0, so the checkpoint of
  step 1 holds the weights the run started from."""
  return train(str(workdir), model=model,
               data=DataConfig(source=corpus, seq_len=32, batch_size=8, validation_fraction=0.0),
               optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
               loop=LoopConfig(steps=steps, log_every=1, checkpoint_every=checkpoint_every,
                               sample_tokens=0),
               devices=jax.devices()[:1], progress=False, init_from=init_from)


def saved_params(workdir: pathlib.Path, step: int) -> dict:
  """The parameters a checkpoint holds, read by orbax alone."""
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(workdir / "checkpoints" / str(step) / "state")
  return jax.tree.map(np.asarray, state["params"])


def recorded_start(workdir: pathlib.Path):
  return json.loads((workdir / "config.json").read_text())["init_from"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus):
  """A pre-norm workdir trained 2 steps."""
  workdir = tmp_path_factory.mktemp("source")
  run(workdir, corpus, steps=2)
  return workdir


@pytest.fixture(scope="module")
def started(tmp_path_factory, corpus, source):
  """A pre-norm run started from the source and trained 1 step; its metrics."""
  workdir = tmp_path_factory.mktemp("started")
  history = run(workdir, corpus, steps=1, init_from=str(source))
  assert history[0]["learning_rate"] == 0.0  # so step 1's checkpoint holds the start
  return workdir, history


@pytest.fixture(scope="module")
def widened(tmp_path_factory, corpus, source):
  """The source retrofitted to mHC and trained 3 steps, a checkpoint after each; its
  metrics and what it printed."""
  workdir = tmp_path_factory.mktemp("widened")
  model = dataclasses.replace(TINY, residual="mhc", stream_reduction="mean")
  with contextlib.redirect_stdout(io.StringIO()) as out:
    history = run(workdir, corpus, steps=3, model=model, init_from=str(source),
                  checkpoint_every=1)
  assert history[0]["learning_rate"] == 0.0
  return workdir, history, out.getvalue()


def test_workdir_start_holds_its_weights_records_it_and_resumes(started, corpus, source,
                                                                capsys):
  workdir, _ = started
  start, pretrained = saved_params(workdir, 1), saved_params(source, 2)
  jax.tree.map(np.testing.assert_array_equal, start, pretrained)
  record = {"path": str(source), "kind": "workdir", "step": 2, "residual": "prenorm"}
  assert recorded_start(workdir) == record
  # A resume continues from its checkpoint (the same command: init_from is given again)
  # and keeps the record, as config.json is written anew.
  run(workdir, corpus, steps=2, init_from=str(source))
  assert "resuming at step 1" in capsys.readouterr().out
  assert recorded_start(workdir) == record
  other = source.parent
  message = f"{workdir} started from {source}, not from {other}: resume it without --init_from"
  with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
    run(workdir, corpus, steps=3, init_from=str(other))


def test_retrofitted_start_computes_the_same_loss_then_every_site_parameter_moves(
    started, widened, source):
  (_, prenorm), (workdir, history, out) = started, widened
  assert f"starting from {source} step 2 (retrofitted to mhc, n=4)\n" in out
  # The same first batch: the widened model computes the pre-norm model's loss.
  np.testing.assert_allclose(history[0]["train_loss"], prenorm[0]["train_loss"], rtol=1e-6)
  assert recorded_start(workdir) == {"path": str(source), "kind": "workdir", "step": 2,
                                     "residual": "prenorm"}
  start, last = saved_params(workdir, 1)["blocks"], saved_params(workdir, 3)["blocks"]
  stuck = [f"{site}/{name}[{layer}]" for site in SITES for name in start[site]
           for layer in range(TINY.num_layers)
           if np.array_equal(start[site][name][layer], last[site][name][layer])]
  assert not stuck, f"never moved in 2 updates: {stuck}"


def hf_config(**changes) -> ModelConfig:
  """The config of the tiny Qwen3 fixture (GQA, head_dim 8, q/k norm, tied)."""
  return dataclasses.replace(TINY, vocab_size=64, num_kv_heads=2, head_dim_override=8,
                             qk_norm=True, embed_scale=False, norm_eps=1e-5, **changes)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_hugging_face_start_holds_what_load_hf_checkpoint_loads(scan_layers):
  pytest.importorskip("safetensors")
  from mhc_jax.lm import load_hf_checkpoint
  params, record = load_params(str(FIXTURES / "qwen3"), hf_config(scan_layers=scan_layers), 0)
  expected = nnx.to_pure_dict(nnx.state(load_hf_checkpoint(FIXTURES / "qwen3",
                                                            scan_layers=scan_layers)))
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  assert record == {"path": str(FIXTURES / "qwen3"), "kind": "huggingface",
                    "residual": "prenorm"}


@pytest.mark.parametrize("residual", ["hc", "mhc", "mhc_lite"])
def test_hugging_face_start_retrofitted_keeps_the_logits(residual):
  pytest.importorskip("safetensors")
  model = hf_config(residual=residual, stream_reduction="mean", scan_layers=False)
  params, _ = load_params(str(FIXTURES / "qwen3"), model, 0)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  tokens = np.load(FIXTURES / "qwen3" / "tokens.npy")
  # One program: op by op, each of the model's many small ops would compile on its own.
  after = jax.jit(lambda state: nnx.merge(graphdef, state)(tokens))(state)
  before = np.load(FIXTURES / "qwen3" / "logits.npy")
  scale = np.abs(before).max()
  assert scale > 1.0  # a real check, not one of near-zero logits
  # transformers' logits, which ours match to 1e-5 (test_hf.py), plus the retrofit's rounding
  np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * scale)


def cli(workdir, init_from, corpus, **bindings) -> int:
  args = ["--no_progress", "--gin_file", "base.gin", "--workdir", str(workdir),
          "--init_from", str(init_from)]
  tiny = {"d_model": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64}
  for name, value in {**tiny, **bindings}.items():
    args += ["--gin_param", f"ModelConfig.{name} = {value!r}"]
  args += ["--gin_param", f"DataConfig.source = {corpus!r}"]
  return cli_lib.main(args)


def copy_hf(tmp_path, drop_tensor=None, **config_changes) -> pathlib.Path:
  folder = pathlib.Path(shutil.copytree(FIXTURES / "qwen3", tmp_path / "qwen3"))
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(config | config_changes))
  if drop_tensor:
    from safetensors.numpy import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    del tensors[drop_tensor]
    save_file(tensors, folder / "model.safetensors")
  return folder


QWEN3_BINDINGS = {"vocab_size": 64, "num_kv_heads": 2, "head_dim_override": 8,
                  "qk_norm": True, "embed_scale": False, "norm_eps": 1e-5}


def no_config(tmp_path, source):
  (tmp_path / "empty").mkdir()
  return tmp_path / "empty", {}


def no_weights(tmp_path, source):
  (tmp_path / "config_only").mkdir()
  shutil.copy(FIXTURES / "qwen3" / "config.json", tmp_path / "config_only")
  return tmp_path / "config_only", QWEN3_BINDINGS


def no_checkpoint(tmp_path, source):
  (tmp_path / "unsaved").mkdir()
  shutil.copy(source / "config.json", tmp_path / "unsaved")
  return tmp_path / "unsaved", {}


def missing_tensor(tmp_path, source):
  return copy_hf(tmp_path, drop_tensor="model.norm.weight"), QWEN3_BINDINGS


def unsupported(tmp_path, source):
  return copy_hf(tmp_path, model_type="mistral"), QWEN3_BINDINGS


def damaged_workdir(checkpoints_before_it):
  """A copy of the source whose checkpoint of step 2 has its array data overwritten, with a
  copy of it as step 1 when `checkpoints_before_it`."""
  def make(tmp_path, source):
    copy = pathlib.Path(shutil.copytree(source, tmp_path / "copy"))
    if checkpoints_before_it:
      shutil.copytree(copy / "checkpoints" / "2", copy / "checkpoints" / "1")
    files = [f for f in (copy / "checkpoints" / "2" / "state").rglob("*") if f.is_file()]
    largest = max(files, key=lambda f: f.stat().st_size)
    largest.write_bytes(np.random.default_rng(0).bytes(largest.stat().st_size))
    return copy, {}
  return make


def shapes_unlike_its_config(tmp_path, source):
  copy = pathlib.Path(shutil.copytree(source, tmp_path / "copy"))
  config = json.loads((copy / "config.json").read_text())
  config["model"]["mlp_dim"] = 48
  (copy / "config.json").write_text(json.dumps(config))
  return copy, {"mlp_dim": 48}


@pytest.mark.parametrize("make, bindings, message", [
    (lambda tmp_path, source: (tmp_path / "nowhere", {}), {},
     "init_from {dir} is not a directory"),
    (no_config, {},
     "init_from {dir} holds no config.json: neither a Hugging Face checkpoint nor an mhc-train "
     "workdir"),
    (no_weights, {}, "{dir} has neither model.safetensors nor model.safetensors.index.json"),
    (no_checkpoint, {}, "init_from {dir} holds no complete checkpoint in checkpoints/: "
     "nothing to start from"),
    (missing_tensor, {}, "tensor model.norm.weight is missing from the checkpoint"),
    (unsupported, {}, "config.json model_type must be one of llama, qwen3; got 'mistral'"),
    (lambda tmp_path, source: (FIXTURES / "qwen3", {}), {},
     "ModelConfig.vocab_size is 258, the checkpoint {dir} has 64: set ModelConfig.vocab_size = "
     "64; also ModelConfig.num_kv_heads = 2, ModelConfig.qk_norm = True, "
     "ModelConfig.embed_scale = False, ModelConfig.norm_eps = 1e-05"),
    (lambda tmp_path, source: (source, {}), {"d_model": 64},
     "ModelConfig.d_model is 64, the checkpoint {dir} has 32: set ModelConfig.d_model = 32"),
    (damaged_workdir(checkpoints_before_it=True), {},
     "the checkpoint of step 2 in {dir}/checkpoints is damaged: its parameters (state/) cannot "
     "be read; rm -r {dir}/checkpoints/2 and rerun the same command to start from its step 1"),
    (damaged_workdir(checkpoints_before_it=False), {},
     "the checkpoint of step 2 in {dir}/checkpoints is damaged: its parameters (state/) cannot "
     "be read, and it is the only one: start from another workdir"),
    (shapes_unlike_its_config, {},
     "the checkpoint of step 2 in {dir} does not fit the model its config.json describes: it "
     "holds float32[2, 64, 32] for params.blocks.mlp.w_down, this config needs "
     "float32[2, 48, 32]"),
    (lambda tmp_path, source: (source, {}), {"residual": "postnorm"},
     "ModelConfig.residual is 'postnorm', the checkpoint {dir} holds a 'prenorm' model: set "
     f"ModelConfig.residual = 'prenorm', or {', '.join(RETROFIT_RESIDUALS)} to retrofit it"),
    (lambda tmp_path, source: (source, {}), {"residual": "mhc"},
     "ModelConfig.stream_reduction is 'sum', the checkpoint {dir} retrofitted to mhc has "
     "'mean': set ModelConfig.stream_reduction = 'mean'"),
], ids=["missing", "no_config", "no_weights", "no_checkpoint", "missing_tensor", "unsupported",
        "hf_shapes", "workdir_shapes", "damaged_workdir", "damaged_only_checkpoint",
        "shapes_unlike_its_config", "postnorm", "sum_of_streams"])
def test_bad_start_is_one_line_exit_2_and_writes_nothing(tmp_path, corpus, source, monkeypatch,
                                                         capsys, make, bindings, message):
  pytest.importorskip("safetensors")
  monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # main's hooks are undone afterwards
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  folder, needed = make(tmp_path, source)
  workdir = tmp_path / "workdir"
  assert cli(workdir, folder, corpus, **needed, **bindings) == 2
  err = capsys.readouterr().err
  assert err == f"mhc-train: ValueError: {message.format(dir=folder)}\n", err
  assert not workdir.exists()


def test_difference_names_the_fields_in_force_that_fix_the_function():
  mhc = dataclasses.replace(TINY, residual="mhc")
  # What changes only how the model runs, and a default spelled out, are no difference.
  assert difference(TINY, dataclasses.replace(TINY, num_kv_heads=4, dtype="bfloat16",
                                              scan_layers=False, remat="full")) is None
  assert difference(TINY, dataclasses.replace(mhc, d_model=64)) == (
      "residual=prenorm d_model=32", "residual=mhc d_model=64")
  assert difference(mhc, with_residual(mhc, "mhc", num_streams=2, sinkhorn_iters=8)) == (
      "MHC.num_streams=4 MHC.sinkhorn_iters=20", "MHC.num_streams=2 MHC.sinkhorn_iters=8")
  # Its backend changes how it runs, not what it computes.
  assert difference(mhc, with_residual(mhc, "mhc", sinkhorn_backend="xla")) is None
  # Sinkhorn's iterations belong to mHC alone.
  assert difference(mhc, with_residual(mhc, "hc")) == ("residual=mhc", "residual=hc")


def test_stream_model_continues_only_as_its_own_variant(widened):
  workdir = widened[0]
  message = (f"ModelConfig.residual is 'hc', the checkpoint {workdir} holds a 'mhc' model: set "
             "ModelConfig.residual = 'mhc'")
  with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
    load_params(str(workdir), dataclasses.replace(TINY, residual="hc"), 0)
  with pytest.raises(ValueError, match="MHC.num_streams is 2, .* has 4: set "
                                       "MHC.num_streams = 4$"):
    load_params(str(workdir), dataclasses.replace(
        with_residual(TINY, "mhc", num_streams=2), stream_reduction="mean"), 0)


@pytest.mark.parametrize("how", ["truncated", "random_bytes"])
def test_damaged_safetensors_is_one_line_exit_2_and_writes_nothing(tmp_path, corpus,
                                                                     monkeypatch, capsys, how):
  pytest.importorskip("safetensors")
  monkeypatch.setattr(sys, "excepthook", sys.excepthook)
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  folder = copy_hf(tmp_path)
  weights = folder / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2] if how == "truncated"
                      else np.random.default_rng(0).bytes(len(data)))
  workdir = tmp_path / "workdir"
  assert cli(workdir, folder, corpus, **QWEN3_BINDINGS) == 2
  err = capsys.readouterr().err
  assert re.fullmatch(rf"mhc-train: ValueError: {re.escape(str(weights))} is not a valid "
                      r"safetensors file \([^\n]+\): it is damaged or incomplete; download it "
                      r"again\n", err), err
  assert not workdir.exists()
