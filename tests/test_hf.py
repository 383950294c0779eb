"""`load_hf_checkpoint` against logits transformers computed (tests/fixtures/hf, made by
`make_fixtures.py`; neither torch nor transformers is needed here), and its one-line errors."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors.numpy import load_file, save_file  # noqa: E402

from mhc_jax.lm import load_hf_checkpoint  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


def logits_of(model, folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """-> (our logits, transformers' logits) on the fixture's tokens."""
  tokens = jnp.asarray(np.load(folder / "tokens.npy"))
  return np.asarray(model(tokens)), np.load(folder / "logits.npy")


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_logits_match_transformers(name, scan_layers):
  model = load_hf_checkpoint(FIXTURES / name, scan_layers=scan_layers)
  ours, theirs = logits_of(model, FIXTURES / name)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


def test_config_carries_what_the_checkpoints_ask_for():
  llama = load_hf_checkpoint(FIXTURES / "llama").cfg
  qwen3 = load_hf_checkpoint(FIXTURES / "qwen3").cfg
  assert (llama.kv_heads, llama.head_dim, llama.qk_norm, llama.tie_embeddings) == (2, 16, False,
                                                                                   False)
  assert (qwen3.kv_heads, qwen3.head_dim, qwen3.qk_norm, qwen3.tie_embeddings) == (2, 8, True,
                                                                                   True)
  assert (llama.rope_base, llama.norm_eps, llama.embed_scale, llama.residual) == (
      5e5, 1e-5, False, "prenorm")


def test_bfloat16_activations_stay_close():
  model = load_hf_checkpoint(FIXTURES / "llama", dtype="bfloat16")
  ours, theirs = logits_of(model, FIXTURES / "llama")
  assert np.abs(ours - theirs).max() < 0.05 * np.abs(theirs).max()


def copy_fixture(tmp_path, name: str) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_config(folder: pathlib.Path, **changes) -> None:
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(config | changes))


def assert_one_line(error, match: str) -> None:
  assert match in str(error.value), str(error.value)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("name,changes,match", [
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5}},
     "rope_parameters.rope_type"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4}, "use_sliding_window"),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("qwen3", {"num_experts": 8}, "num_experts"),
    ("llama", {"model_type": "mistral"}, "model_type"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"tie_word_embeddings": True}, "tie_word_embeddings"),
    ("qwen3", {"tie_word_embeddings": False}, "tensor lm_head.weight is missing"),
    ("llama", {"head_dim": 8},
     "tensor model.layers.0.self_attn.q_proj.weight in model-00001-of-00002.safetensors has "
     "shape (64, 32), config.json says (32, 32)"),
    ("qwen3", {"num_hidden_layers": 1}, "tensor model.layers.1."),
])
def test_unsupported_or_inconsistent_configs_fail_in_one_line(tmp_path, name, changes, match):
  folder = copy_fixture(tmp_path, name)
  edit_config(folder, **changes)
  with pytest.raises(ValueError) as err:
    load_hf_checkpoint(folder)
  assert_one_line(err, match)


def test_folder_without_config_fails_in_one_line(tmp_path):
  folder = copy_fixture(tmp_path, "qwen3")
  (folder / "config.json").unlink()
  with pytest.raises(FileNotFoundError) as err:
    load_hf_checkpoint(folder)
  assert_one_line(err, "config.json does not exist")


def test_folder_without_weights_fails_in_one_line(tmp_path):
  folder = copy_fixture(tmp_path, "qwen3")
  (folder / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError) as err:
    load_hf_checkpoint(folder)
  assert_one_line(err, "has neither model.safetensors nor model.safetensors.index.json")


def test_missing_shard_fails_in_one_line(tmp_path):
  folder = copy_fixture(tmp_path, "llama")
  (folder / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(FileNotFoundError) as err:
    load_hf_checkpoint(folder)
  assert_one_line(err, "model-00002-of-00002.safetensors, listed in "
                  "model.safetensors.index.json, does not exist")


def test_missing_tensor_fails_in_one_line(tmp_path):
  folder = copy_fixture(tmp_path, "qwen3")
  tensors = load_file(folder / "model.safetensors")
  del tensors["model.layers.1.self_attn.k_norm.weight"]
  save_file(tensors, folder / "model.safetensors")
  with pytest.raises(ValueError) as err:
    load_hf_checkpoint(folder)
  assert_one_line(err, "tensor model.layers.1.self_attn.k_norm.weight is missing")


def damage(path: pathlib.Path, how: str) -> None:
  """Truncated to half (an interrupted download) or random bytes of the same size."""
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2] if how == "truncated"
                   else np.random.default_rng(0).bytes(len(data)))


@pytest.mark.parametrize("how", ["truncated", "random_bytes"])
def test_damaged_safetensors_fails_in_one_line_naming_the_file(tmp_path, how):
  folder = copy_fixture(tmp_path, "qwen3")
  damage(folder / "model.safetensors", how)
  with pytest.raises(ValueError) as err:
    load_hf_checkpoint(folder)
  assert_one_line(err, f"{folder / 'model.safetensors'} is not a valid safetensors file (")
  assert str(err.value).endswith("): it is damaged or incomplete; download it again")


def test_damaged_shard_index_fails_in_one_line_naming_it(tmp_path):
  folder = copy_fixture(tmp_path, "llama")
  (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
  with pytest.raises(ValueError) as err:
    load_hf_checkpoint(folder)
  assert_one_line(err, f"{folder / 'model.safetensors.index.json'} is not JSON: ")


def write_safetensors(path: pathlib.Path, header: dict, data: bytes) -> None:
  """A safetensors file of exactly `header` (JSON) and `data`."""
  text = json.dumps(header).encode()
  path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_a_tensor_of_integers_fails_in_one_line_naming_it(tmp_path):
  folder = copy_fixture(tmp_path, "qwen3")
  tensors = load_file(folder / "model.safetensors")
  tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int64)
  save_file(tensors, folder / "model.safetensors")
  with pytest.raises(ValueError) as err:
    load_hf_checkpoint(folder)
  assert_one_line(err, "tensor model.norm.weight in model.safetensors is I64: only F64, F32, "
                  "F16, BF16 tensors load; convert the checkpoint to bfloat16 or float32")


@pytest.mark.parametrize("header, data, why", [
    ({"model.norm.weight": {"dtype": "F32", "shape": [4]}}, b"\0" * 16,
     "its header entry 'model.norm.weight' is no tensor's"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}},
     b"\0" * 16, "tensor model.norm.weight F32 [4] at bytes 0..12 of 16"),
    (["not", "an", "object"], b"", "its header is no JSON object"),
])
def test_a_header_that_cannot_describe_its_tensors_fails_in_one_line(tmp_path, header, data,
                                                                     why):
  folder = copy_fixture(tmp_path, "qwen3")
  write_safetensors(folder / "model.safetensors", header, data)
  with pytest.raises(ValueError) as err:
    load_hf_checkpoint(folder)
  assert_one_line(err, f"{folder / 'model.safetensors'} is not a valid safetensors file "
                  f"({why}): it is damaged or incomplete; download it again")
