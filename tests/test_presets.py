"""mhc_jax.lm.presets, the gin edge: files and bindings -> the configs `train()` takes, one
line naming a bad one, no gin state carried between calls, and a library that needs no gin."""

import pathlib
import subprocess
import sys

import pytest

from mhc_jax.lm import presets
from mhc_jax.lm.model import ModelConfig
from mhc_jax.lm.train_state import LoopConfig

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_files_then_bindings_build_every_config():
  configs, text = presets.parse(["shakespeare_tiny.gin", "residual/mhc.gin"],
                                ["LoopConfig.steps = 7", 'DataConfig.source = ("a", "b")'])
  assert set(configs) == set(presets.CONFIG_CLASSES)
  assert configs["model"] == ModelConfig(d_model=128, num_layers=4, num_heads=4, mlp_dim=512,
                                         residual="mhc", num_streams=4)
  assert configs["loop"].steps == 7 and configs["loop"].eval_every == 150
  assert configs["data"].source == ("a", "b") and configs["data"].seq_len == 128
  assert "LoopConfig.steps = 7" in text and "ModelConfig.residual = 'mhc'" in text


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


def test_every_preset_parses():
  for name in presets.preset_names():
    if not name.startswith(("compare/", "sweeps/", "retrofit/")):  # experiments' own settings
      presets.parse([name])


def test_the_library_and_the_training_loop_import_without_gin():
  code = ("import sys; sys.modules['gin'] = None\n"  # any `import gin` now fails
          "import mhc_jax, mhc_jax.lm, mhc_jax.lm.train, mhc_jax.linen\n"
          "print('ok')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
