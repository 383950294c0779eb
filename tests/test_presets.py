"""mhc_jax.lm.presets, the gin edge: files and bindings -> the configs `train()` takes, one
line naming a bad one, no gin state carried between calls, and a library that needs no gin."""

import pathlib
import subprocess
import sys

import pytest

from mhc_jax.lm import presets
from mhc_jax.lm.model import ModelConfig
from mhc_jax.lm.residuals import MHC
from mhc_jax.lm.train import LoopConfig

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_files_then_bindings_build_every_config():
  configs, text = presets.parse(["shakespeare_tiny.gin", "residual/mhc.gin"],
                                ["LoopConfig.steps = 7", 'DataConfig.source = ("a", "b")'])
  assert set(configs) == set(presets.CONFIG_CLASSES)
  assert configs["model"] == ModelConfig(d_model=128, num_layers=4, num_heads=4, mlp_dim=512,
                                         residual="mhc")
  assert configs["loop"].steps == 7 and configs["loop"].eval_every == 150
  assert configs["data"].source == ("a", "b") and configs["data"].seq_len == 128
  assert "LoopConfig.steps = 7" in text and "ModelConfig.residual = 'mhc'" in text


@pytest.mark.parametrize("preset", sorted(presets.PRESET_DIR.glob("residual/*.gin")))
def test_the_residual_presets_bind_their_variants_settings(preset):
  model = presets.parse([str(preset)], ["ModelConfig.d_model = 32"])[0]["model"]
  assert preset.stem == model.residual
  settings = type(model.residual_settings).__name__ if model.uses_streams else None
  bound = [line.split(".")[0] for line in preset.read_text().splitlines()
           if line and not line.startswith(("#", "ModelConfig.residual"))]
  assert set(bound) == ({settings} if settings else set())


def test_a_variants_settings_come_from_its_bindings():
  model = presets.parse([], ['ModelConfig.residual = "mhc"', "MHC.sinkhorn_iters = 7",
                             "MHC.num_streams = 2", "HC.num_streams = 4"])[0]["model"]
  assert model.residual_settings == MHC(num_streams=2, sinkhorn_iters=7)
  # Another variant's class bound to its default changes nothing, and is no error.
  with pytest.raises(presets.GinError, match="^HC.dynamic is bound, but"):
    presets.parse([], ['ModelConfig.residual = "mhc"', "HC.dynamic = False"])


def test_calls_do_not_see_each_others_bindings():
  presets.parse([], ["LoopConfig.steps = 7"])
  configs, text = presets.parse([], [])
  assert configs["loop"] == LoopConfig() and "steps" not in text


def test_an_extra_configurable_is_built_from_the_same_bindings():
  import gin

  @gin.configurable
  def settings(width=1):
    return {"width": width}

  configs, _ = presets.parse([], ["settings.width = 3"], extra={"settings": settings})
  assert configs["settings"] == {"width": 3}


@pytest.mark.parametrize("files, bindings, message", [
    (["no_such.gin"], [], "bad gin file 'no_such.gin'"),
    ([], ["ModelConfig.residual = mhc"],
     'strings need quotes, e.g. ModelConfig.residual = "mhc"'),
    ([], ["ModelConfig.nope = 1"], "bad gin binding 'ModelConfig.nope = 1'"),
    ([], ["ModelConfig.d_model = 0"], "bad configuration: ValueError: d_model must be an int"),
])
def test_a_bad_file_or_binding_is_one_line_naming_it(files, bindings, message):
  with pytest.raises(presets.GinError) as error:
    presets.parse(files, bindings)
  assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("given, applied", [
    (["residual/mhc.gin"], ["shakespeare_tiny.gin", "residual/mhc.gin"]),  # alone: adds to it
    ([], ["shakespeare_tiny.gin"]),
    (["shakespeare_small.gin", "residual/hc.gin"], ["shakespeare_small.gin", "residual/hc.gin"]),
    (["base.gin"], ["base.gin"]),
    (["tpu_pod_mhc.gin"], ["tpu_pod_mhc.gin"]),  # includes base.gin and residual/mhc.gin
    # An add-on before its experiment would be overridden by it (shakespeare_tiny.gin binds
    # ModelConfig.residual): it applies after, as it reads.
    (["residual/mhc.gin", "shakespeare_tiny.gin"], ["shakespeare_tiny.gin", "residual/mhc.gin"]),
])
def test_add_on_presets_compose_over_an_experiment(given, applied):
  assert presets.compose(given, "shakespeare_tiny.gin") == applied


def test_a_file_of_ones_own_is_an_experiment_when_it_includes_base_gin(tmp_path):
  own = tmp_path / "own.gin"
  own.write_text("ModelConfig.d_model = 48\n")  # includes nothing: an add-on
  assert presets.compose([str(own)], "shakespeare_tiny.gin") == ["shakespeare_tiny.gin", str(own)]
  nested = tmp_path / "nested.gin"  # includes base.gin through another experiment
  nested.write_text("include 'shakespeare_small.gin'\nModelConfig.d_model = 48\n")
  assert presets.compose([str(nested)], "shakespeare_tiny.gin") == [str(nested)]


def test_a_preset_of_an_experiments_script_names_the_script():
  with pytest.raises(presets.GinError) as error:
    presets.compose(["residual/mhc.gin", "retrofit/cpu.gin"], "shakespeare_tiny.gin")
  assert str(error.value) == ("retrofit/cpu.gin is for python -m experiments.retrofit (from a "
                              "checkout), not for mhc-train")


def test_composing_a_bad_file_is_the_same_one_line_as_parsing_it():
  with pytest.raises(presets.GinError, match="^bad gin file 'no_such.gin': [^\n]*$"):
    presets.compose(["no_such.gin"], "shakespeare_tiny.gin")


def test_mhc_train_lists_every_preset_it_runs_and_none_of_the_experiments_settings():
  listed = presets.mhc_train_presets()
  assert {"base.gin", "shakespeare_tiny.gin", "tpu_pod_mhc.gin", "residual/mhc.gin"} <= set(listed)
  assert not {"compare/cpu.gin", "retrofit/cpu.gin", "sweeps/residuals_tiny.gin"} & set(listed)
  for name in listed:
    presets.parse([name])


def test_the_library_and_the_training_loop_import_without_gin():
  code = ("import sys; sys.modules['gin'] = None\n"  # any `import gin` now fails
          "import mhc_jax, mhc_jax.lm, mhc_jax.lm.train, mhc_jax.linen\n"
          "print('ok')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
