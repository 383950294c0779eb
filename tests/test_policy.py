"""mhc_jax.lm.policy: the model behind google-tunix's model interface. Its logits equal the
model's full forward for every residual variant, without a cache (tunix's learner) and through
the cache (tunix's sampler: a prefill, then a token per step), with the masks tunix builds.
With tunix installed (the RL environment, not the project's own), tunix's own sampler and
log-probabilities run on it, and one GRPO step trains it."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from mhc_jax.lm.model import ModelConfig, Transformer
from mhc_jax.lm.policy import Policy, TunixTokenizer
from mhc_jax.lm.residuals import with_residual
from mhc_jax.lm.sharding import MeshConfig, make_mesh
from mhc_jax.lm.tokenizer import EOS, PAD, VOCAB_SIZE, ByteTokenizer
from random_models import far_from_init
from test_generate import (F32_TOL, VARIANTS, full_logits, left_padded, random_model,
                           random_rows)

PROMPT_LENGTHS = (5, 2, 7)  # left-padded to WIDTH, as tunix pads prompts
WIDTH, STEPS, SLOTS = 8, 3, 16


def learner_mask(real: np.ndarray) -> np.ndarray:
  """tunix's mask for the learner (`tunix.rl.common.process_ids`): `[batch, seq, seq]`, each
  token sees the real tokens up to its own."""
  seq = real.shape[1]
  return real[:, None, :] & np.tril(np.ones((seq, seq), bool))


def prefill_mask(real: np.ndarray, slots: int) -> np.ndarray:
  """tunix's sampler's prefill mask (`tunix.generate.utils.make_causal_attn_mask`): the
  learner's, padded with unseen slots to the cache's size."""
  return np.pad(learner_mask(real), ((0, 0), (0, 0), (0, slots - real.shape[1])))


def step_mask(real_slots: np.ndarray, step: int) -> np.ndarray:
  """tunix's sampler's mask for the token at slot `step` (`tunix.generate.utils.
  compute_attention_masks`): `[batch, 1, slots]`, the real slots up to its own."""
  return (real_slots & (np.arange(real_slots.shape[1]) <= step))[:, None, :]


@functools.cache
def policy_call(model: Transformer):
  """The policy of `model`, compiled: (tokens, positions, cache, attention_mask,
  last_only) -> (logits, cache). Merged inside the trace, as tunix does: scanned layers
  split the model there."""
  graphdef, state = nnx.split(Policy(model))
  run = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args), static_argnums=5)
  return lambda *args: run(state, *args)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
  scale = np.abs(want).max()
  assert scale > 1.0  # a real check, not one of near-zero logits
  return np.abs(got - want).max() / scale


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_policy_without_a_cache_is_the_full_forward(variant):
  model, rows = random_model(variant), random_rows(1, [3, 8, 5])
  tokens, positions, real = left_padded(rows, 8)
  logits, cache = policy_call(model)(tokens, positions, None, learner_mask(real), False)
  assert cache is None
  worst = max(relative_error(np.asarray(logits)[i, 8 - len(row):], full_logits(model, row, 1))
              for i, row in enumerate(rows))
  assert worst <= F32_TOL, worst


def sampled_logits(model: Transformer, rows: list[np.ndarray]) -> list[np.ndarray]:
  """Each row's logits through the policy as tunix's sampler calls it: its first
  `PROMPT_LENGTHS[i]` tokens left-padded to `WIDTH` and prefilled (the last token's logits
  only), then the next `STEPS` fed one per step, at slots `WIDTH`.. -> per row `[1 + STEPS,
  vocab]`."""
  call = policy_call(model)
  prompts = [row[:n] for row, n in zip(rows, PROMPT_LENGTHS)]
  tokens, positions, real = left_padded(prompts, WIDTH)
  cache = Policy(model).init_cache(len(rows), SLOTS, "float32")
  logits, cache = call(tokens, positions, cache, prefill_mask(real, SLOTS), True)
  out = [logits[:, 0]]
  real_slots = np.pad(real, ((0, 0), (0, SLOTS - WIDTH)), constant_values=True)
  for t in range(STEPS):
    step_tokens = np.array([[row[n + t]] for row, n in zip(rows, PROMPT_LENGTHS)], np.int32)
    step_positions = np.array(PROMPT_LENGTHS)[:, None] + t
    logits, cache = call(step_tokens, step_positions, cache, step_mask(real_slots, WIDTH + t),
                         False)
    out.append(logits[:, 0])
  stacked = np.stack(jax.device_get(out), axis=1)
  return [stacked[i] for i in range(len(rows))]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_policy_decoding_through_its_cache_is_the_full_forward(variant):
  model = random_model(variant)
  rows = random_rows(2, [n + STEPS for n in PROMPT_LENGTHS])
  worst = max(relative_error(cached, full_logits(model, row, n))
              for row, n, cached in zip(rows, PROMPT_LENGTHS, sampled_logits(model, rows)))
  assert worst <= F32_TOL, worst


def test_the_policy_reads_only_its_tokens_own_entries_of_the_mask():
  # A prefill whose prompt has padding in the middle: the padded token is invisible to those
  # after it, as a model mask of False there makes it.
  model, row = random_model("mhc"), random_rows(3, [6])[0][None]
  positions, real = np.arange(6)[None], np.array([[True, True, False, True, True, True]])
  logits, _ = policy_call(model)(row, positions, None, learner_mask(real), False)
  expected = nnx.merge(*nnx.split(model))(row, positions, real)
  np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(expected)[real], rtol=0,
                             atol=F32_TOL * np.abs(expected).max())


def test_the_policy_refuses_a_mask_of_another_shape_in_one_line():
  model = random_model("prenorm")
  tokens = np.zeros((2, 4), np.int32)
  with pytest.raises(ValueError, match=r"^attention_mask has shape \(2, 4, 8\); for 4 tokens "
                                       r"and no cache it must be \(2, 4, 4\)$"):
    Policy(model)(tokens, tokens, None, np.ones((2, 4, 8), bool))
  cache = Policy(model).init_cache(2, 16)
  with pytest.raises(ValueError, match=r"^attention_mask has shape \(2, 4, 4\); for 4 tokens "
                                       r"and a cache of 16 slots it must be \(2, 4, 16\)$"):
    Policy(model)(tokens, tokens, cache, np.ones((2, 4, 4), bool))


def byte_model(seed: int = 0, far: bool = True, scan_layers: bool = True) -> Transformer:
  """A 2-layer mHC model of the byte vocabulary (tunix's sampler takes text): weights far
  from initialisation (logits that spread), or as initialised (near-uniform draws)."""
  cfg = with_residual(ModelConfig(vocab_size=VOCAB_SIZE, d_model=32, num_layers=2,
                                  num_heads=4, num_kv_heads=2, mlp_dim=64, remat="none",
                                  scan_layers=scan_layers), "mhc")
  return far_from_init(cfg, seed) if far else Transformer(cfg, rngs=nnx.Rngs(seed))


PROMPTS = ["2+3=", "ten - four =", "7"]  # within 16 bytes: max_prompt_length


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_tunix_greedy_sampling_gives_the_tokens_of_generate(scan_layers):
  pytest.importorskip("tunix")
  from tunix.generate import sampler as tunix_sampler
  from mhc_jax.lm import generate

  model, tokenizer = byte_model(scan_layers=scan_layers), ByteTokenizer()
  sampler = tunix_sampler.Sampler(
      Policy(model), TunixTokenizer(tokenizer, PAD),
      tunix_sampler.CacheConfig(cache_size=32, num_layers=2, num_kv_heads=2, head_dim=8))
  out = sampler(PROMPTS, max_generation_steps=10, max_prompt_length=WIDTH * 2,
                eos_tokens=[EOS])
  expected = generate(model, [tokenizer.encode(p) for p in PROMPTS], 10, eos_id=EOS)
  for got, want in zip(out.tokens, expected):
    assert np.asarray(got).tolist() == [t for t in want.tolist() if t != EOS]
  assert len({tuple(np.asarray(t).tolist()) for t in out.tokens}) == len(PROMPTS)


def test_tunix_log_probabilities_are_the_full_forwards():
  pytest.importorskip("tunix")
  from tunix.rl import common

  model = byte_model()
  prompts, completions = random_rows(4, [3, 6]), random_rows(5, [4, 2])
  prompt_tokens = left_padded(prompts, 6, pad=PAD)[0]
  completion_tokens = np.full((2, 4), PAD, np.int32)  # right-padded, as tunix's rollout gives
  for i, completion in enumerate(completions):
    completion_tokens[i, :len(completion)] = completion
  graphdef, state = nnx.split(Policy(model))
  logps = np.asarray(common.compute_per_token_logps(graphdef, state, prompt_tokens,
                                                    completion_tokens, PAD, EOS))
  for i, (prompt, completion) in enumerate(zip(prompts, completions)):
    row = np.concatenate([prompt, completion])
    logits = full_logits(model, row, len(prompt))[:-1]
    expected = np.take_along_axis(jax.nn.log_softmax(logits), completion[:, None], 1)[:, 0]
    np.testing.assert_allclose(logps[i, :len(completion)], expected, rtol=0, atol=1e-5)


def digit_reward(prompts, completions, **_):
  """The toy reward: the fraction of a completion's characters that are digits."""
  return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


LEARNING_RATE = 1e-2


def test_one_tunix_grpo_step_trains_the_policy_on_cpu():
  pytest.importorskip("tunix")
  import optax
  from grain import python as grain
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  policy, reference = Policy(byte_model(far=False)), Policy(byte_model(far=False))
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(policy, nnx.Param)))
  # The project's axes (data, fsdp, tensor), which the model's sharding constraints name.
  mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
  config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={role: mesh for role in (rl_cluster_lib.Role.ACTOR,
                                            rl_cluster_lib.Role.REFERENCE,
                                            rl_cluster_lib.Role.ROLLOUT)},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=optax.adam(LEARNING_RATE), eval_every_n_steps=10, max_steps=1),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=8, max_prompt_length=WIDTH * 2, kv_cache_size=32,
          temperature=1.0, eos_tokens=[EOS]))
  cluster = rl_cluster_lib.RLCluster(actor=policy, reference=reference,
                                     tokenizer=TunixTokenizer(ByteTokenizer(), PAD),
                                     cluster_config=config)
  learner = grpo_learner.GRPOLearner(
      rl_cluster=cluster, reward_fns=[digit_reward],
      algo_config=grpo_learner.GRPOConfig(num_generations=4, num_iterations=1, beta=0.04))
  dataset = grain.MapDataset.source(PROMPTS[:2]).batch(2).map(lambda x: {"prompts": x})
  learner.train(dataset)
  assert cluster.actor_trainer.train_steps == 1
  after = nnx.to_pure_dict(nnx.state(cluster.actor_trainer.model, nnx.Param))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                                       after, before))
  rewards = cluster._rl_metrics_logger.get_metric_history("rewards", "digit_reward", "train")
  assert len(rewards) == 1 and 0 < rewards[0] < 1  # one step, rewards neither all 0 nor all 1
  # Adam's first step moves each weight that has a gradient by the learning rate.
  assert max(moved) == pytest.approx(LEARNING_RATE, rel=1e-3)
