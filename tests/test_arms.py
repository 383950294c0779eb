"""The arms of a comparison: specs parsed strictly, ablation settings reaching the model,
compute-matched arms at the FLOPs and parameter counts they promise (checked against
`flops.py` and the instantiated model), at the cpu preset's sizes, without training."""

import dataclasses
import re

import pytest
from flax import nnx

from experiments.arms import Arm, arm_configs, arm_dirname, arm_facts, parse_arm, parse_arms
from experiments.compare_residuals import load_settings
from mhc_jax.lm.flops import model_flops_per_token
from mhc_jax.lm.model import Transformer, count_params
from mhc_jax.lm.residuals import HC, MHC, with_residual


@pytest.fixture(scope="module")
def base() -> dict:
  """The cpu comparison's train configs before any variant is set (as the preset gives them)."""
  settings = load_settings("cpu")
  return {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)
          if field.name != "comparison"}


def instantiated_params(model) -> int:
  return count_params(nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("spec", [
    "prenorm", "mhc_lite", "hc(dynamic=False)", "hc(num_streams=2)", "mhc(sinkhorn_iters=1)",
    "hc(num_streams=2, dynamic=False)", "mhc(sinkhorn_backend='xla')", "prenorm@flops(mhc)",
    "prenorm@params(mhc)", "prenorm@flops(hc(num_streams=2))", "hc(dynamic=False)@params(mhc)"])
def test_a_canonical_spec_round_trips(spec):
  arm = parse_arm(spec)
  assert arm.spec == spec and parse_arm(arm.spec) == arm


def test_parsing_reads_the_parts_and_orders_settings_as_the_variant_declares_them():
  assert parse_arm(" hc( dynamic=False ,num_streams=2 ) ") == Arm(
      "hc", (("num_streams", 2), ("dynamic", False)))
  assert parse_arm("hc(dynamic=False, num_streams=2)").spec == "hc(num_streams=2, dynamic=False)"
  assert parse_arm("prenorm@flops(mhc(sinkhorn_iters=5))") == Arm(
      "prenorm", match="flops", target=Arm("mhc", (("sinkhorn_iters", 5),)))


def test_a_list_of_arms_splits_at_top_level_commas_only():
  assert [a.spec for a in parse_arms("prenorm, hc(num_streams=2, dynamic=False),"
                                     "prenorm@flops(mhc)")] == [
      "prenorm", "hc(num_streams=2, dynamic=False)", "prenorm@flops(mhc)"]
  with pytest.raises(ValueError, match=r"^arm 'hc\(num_streams=2\)' is given twice; "):
    parse_arms("hc(num_streams=2), prenorm, hc(num_streams = 2)")


HC_FIELDS = "hc's settings: num_streams: int, dynamic: bool, num_fracs: int"


@pytest.mark.parametrize("spec, message", [
    ("hc(dynamc=False)", f"arm 'hc(dynamc=False)': no setting 'dynamc'; {HC_FIELDS}"),
    ("hc(dynamic=1)", f"arm 'hc(dynamic=1)': dynamic must be bool, got 1; {HC_FIELDS}"),
    ("hc(num_streams=True)",
     f"arm 'hc(num_streams=True)': num_streams must be int, got True; {HC_FIELDS}"),
    ("hc(num_streams=0)",
     f"arm 'hc(num_streams=0)': HC.num_streams must be an int >= 1, got 0; {HC_FIELDS}"),
    ("mhc(sinkhorn_backend=xla)", "arm 'mhc(sinkhorn_backend=xla)': the value of "
     "sinkhorn_backend must be a literal (2, False, 'auto': strings need quotes); mhc's "
     "settings: num_streams: int, sinkhorn_iters: int, sinkhorn_backend: str, num_fracs: int"),
    ("hc(dynamic=False, dynamic=True)",
     f"arm 'hc(dynamic=False, dynamic=True)': dynamic is given twice; {HC_FIELDS}"),
    ("hc(2)", f"arm 'hc(2)': settings are given as name=value; {HC_FIELDS}"),
    ("prenorm(num_streams=2)", "arm 'prenorm(num_streams=2)': prenorm has no settings; "
     "give it as 'prenorm'"),
    ("resnet", "arm 'resnet': no variant 'resnet'; choose from prenorm, postnorm, hc, "),
    ("prenorm@flop(mhc)", "arm 'prenorm@flop(mhc)': no match 'flop'; give VARIANT@flops(ARM) "
     "or VARIANT@params(ARM)"),
    ("prenorm@flops(mhc, hc)", "arm 'prenorm@flops(mhc, hc)': not an arm; give VARIANT, "),
    ("prenorm@flops(prenorm@params(mhc))", "arm 'prenorm@flops(prenorm@params(mhc))': the "
     "target of @flops must be a variant, with or without settings; got 'prenorm@params(mhc)'"),
    ("prenorm@flops", "arm 'prenorm@flops': not an arm; give VARIANT, "),
    ("hc(", "arm 'hc(': not an arm; give VARIANT, VARIANT(setting=value, ...), "
     "VARIANT@flops(ARM) or VARIANT@params(ARM)"),
    ("prenorm + mhc", "arm 'prenorm + mhc': not an arm; give VARIANT, "),
    ("", "arm '': not an arm; give VARIANT, "),
])
def test_a_bad_spec_is_one_line_naming_the_arm_and_the_way_out(spec, message):
  with pytest.raises(ValueError) as err:
    parse_arm(spec)
  assert "\n" not in str(err.value)
  assert str(err.value).startswith(message)


def test_an_arm_built_directly_is_checked_as_a_parsed_one():
  with pytest.raises(ValueError, match=r"^arm 'prenorm': a match needs a target, and a target "
                     r"a match$"):
    Arm("prenorm", match="flops")
  with pytest.raises(ValueError, match=r"^arm 'hc\(dynamic=0\)': dynamic must be bool, got 0; "):
    Arm("hc", (("dynamic", 0),))


def test_dirnames_are_filesystem_safe_and_tell_the_arms_apart():
  specs = ["prenorm", "hc", "hc(num_streams=2)", "hc(num_streams=2, dynamic=False)",
           "mhc(sinkhorn_backend='xla')", "prenorm@flops(mhc)", "prenorm@params(mhc)",
           "prenorm@flops(hc(num_streams=2))", "mhc_lite"]
  names = [arm_dirname(parse_arm(spec)) for spec in specs]
  assert all(re.fullmatch(r"[A-Za-z0-9._=+@-]+", name) for name in names)
  assert len(set(names)) == len(names)
  assert names[3] == "hc+num_streams=2+dynamic=False"
  assert names[7] == "prenorm@flops-hc+num_streams=2"


def test_ablation_settings_reach_the_model_and_the_comparisons_streams_fill_the_rest(base):
  static = arm_configs(parse_arm("hc(dynamic=False)"), base, num_streams=2)
  assert static["model"].residual == "hc"
  assert static["model"].residual_settings == HC(num_streams=2, dynamic=False)
  one_iter = arm_configs(parse_arm("mhc(sinkhorn_iters=1, num_streams=8)"), base, num_streams=2)
  assert one_iter["model"].residual_settings == MHC(num_streams=8, sinkhorn_iters=1)
  plain = arm_configs(parse_arm("prenorm"), base, num_streams=2)
  assert plain["model"] == dataclasses.replace(base["model"], residual="prenorm")
  assert {k: v for k, v in plain.items() if k != "model"} == {
      k: v for k, v in base.items() if k != "model"}


def test_the_flops_arm_trains_the_targets_flops_with_the_schedule_stretched(base):
  loop, seq, batch = base["loop"], base["data"].seq_len, base["data"].batch_size
  target = arm_facts(parse_arm("mhc"), base, num_streams=4)
  matched = arm_facts(parse_arm("prenorm@flops(mhc)"), base, num_streams=4)
  configs = arm_configs(parse_arm("prenorm@flops(mhc)"), base, num_streams=4)
  prenorm_fpt = model_flops_per_token(dataclasses.replace(base["model"], residual="prenorm"),
                                      seq)
  steps = round(loop.steps * target["flops_per_token"] / prenorm_fpt)
  assert steps == configs["loop"].steps == matched["steps"] == 710  # mHC costs +18% here
  one_step = prenorm_fpt * seq * batch
  assert abs(matched["total_flops"] - target["total_flops"]) <= one_step / 2
  assert matched["flops_per_token"] == prenorm_fpt
  assert matched["tokens"] == steps * seq * batch
  assert matched["ratio"] == matched["total_flops"] / target["total_flops"]
  assert target["total_flops"] == target["flops_per_token"] * loop.steps * seq * batch
  # The same fractions of the run: warm-up, and as many evaluations and checkpoints.
  stretch = steps / loop.steps
  assert configs["optimizer"].warmup_steps == round(base["optimizer"].warmup_steps * stretch)
  assert configs["loop"].eval_every == round(loop.eval_every * stretch)
  assert configs["loop"].checkpoint_every == round(loop.checkpoint_every * stretch)
  assert configs["loop"].log_every == loop.log_every
  assert configs["model"] == dataclasses.replace(base["model"], residual="prenorm")


def test_the_params_arm_is_the_closest_wider_model_and_its_facts_are_the_models(base):
  target = arm_facts(parse_arm("mhc"), base, num_streams=4)
  matched = arm_facts(parse_arm("prenorm@params(mhc)"), base, num_streams=4)
  model = arm_configs(parse_arm("prenorm@params(mhc)"), base, num_streams=4)["model"]
  mhc = with_residual(base["model"], "mhc", num_streams=4)
  assert target["parameters"] == instantiated_params(mhc)
  assert matched["parameters"] == instantiated_params(model)
  assert matched["flops_per_token"] == model_flops_per_token(model, base["data"].seq_len)
  assert matched["ratio"] == matched["parameters"] / target["parameters"]
  assert abs(matched["ratio"] - 1) < 0.02
  # mHC's 18% more parameters are too few for the next d_model (72: +26%), so the MLP widens,
  # to the mlp_dim nearest the target (3 d_model parameters per unit per layer).
  assert (model.d_model, model.num_heads) == (base["model"].d_model, base["model"].num_heads)
  per_unit = 3 * model.d_model * model.num_layers
  assert abs(matched["parameters"] - target["parameters"]) <= per_unit / 2
  assert matched["steps"] == base["loop"].steps


def test_a_large_gap_widens_d_model_in_steps_that_keep_the_head_dim_even(base):
  # mHC-lite's 24 permutations' logits are +47% parameters on a model this narrow.
  small = dict(base, model=dataclasses.replace(base["model"], d_model=32, num_heads=2,
                                               mlp_dim=128))
  target = arm_facts(parse_arm("mhc_lite"), small, num_streams=4)
  matched = arm_facts(parse_arm("prenorm@params(mhc_lite)"), small, num_streams=4)
  model = arm_configs(parse_arm("prenorm@params(mhc_lite)"), small, num_streams=4)["model"]
  assert model.d_model == 36 and model.head_dim == 18
  # The widest step of 2 x num_heads (mlp_dim 4 d_model, as the base's) not over the target.
  over = dataclasses.replace(model, d_model=40, mlp_dim=160)
  assert instantiated_params(over) > target["parameters"]
  assert abs(matched["ratio"] - 1) < 0.02
  assert matched["parameters"] == instantiated_params(model)


def test_a_params_arm_no_width_can_match_is_one_line(base):
  tiny = dict(base, model=dataclasses.replace(base["model"], d_model=16, num_layers=1,
                                              num_heads=2, mlp_dim=4))
  with pytest.raises(ValueError, match=r"^arm 'mhc_lite@params\(prenorm\)': no width of "
                     r"mhc_lite within 2% of prenorm's [\d,]+ parameters \(closest: d_model 16, "
                     r"mlp_dim 1, [\d,]+ parameters, \d\.\d+x\); ") as err:
    arm_configs(parse_arm("mhc_lite@params(prenorm)"), tiny, num_streams=4)
  assert "\n" not in str(err.value)

