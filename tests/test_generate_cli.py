"""`mhc-generate`: what it prints is `generate`'s tokens in the model's tokenizer, for a workdir
and a Hugging Face folder, one prompt or a file's in one batch; seeds reproduce; the
end-of-text token stops a continuation; every bad input is one line naming the argument and
exit 2, with nothing on stdout; the installed console script prints nothing but the result."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mhc_jax.lm import generate_cli, inference
from mhc_jax.lm.decode import generate
from mhc_jax.lm.sample import printable
from test_inference import SEQ_LEN, hf_folder, train_workdir

NEW = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpus):
  return train_workdir(tmp_path_factory.mktemp("workdir"), corpus)


@pytest.fixture(scope="module")
def model(workdir):
  return inference.load(workdir).model


def run(capsys, *argv) -> tuple[int, str, str]:
  """main(argv) in this process -> (exit code, stdout, stderr)."""
  try:
    code = generate_cli.main([str(arg) for arg in argv])
  except SystemExit as exit_:  # argparse's errors, and --help
    code = exit_.code
  out, err = capsys.readouterr()
  return code, out, err


def expected(model, prompts: list[str], new: int = NEW, **settings) -> list[str]:
  """`generate`'s continuations of byte prompts, as text."""
  tokens = [np.frombuffer(p.encode(), np.uint8).astype(np.int32) for p in prompts]
  return [bytes(t for t in row if t < 256).decode(errors="replace")
          for row in generate(model, tokens, new, **settings)]


def test_greedy_output_is_generates_tokens_in_the_workdirs_bytes(capsys, workdir, model):
  code, out, err = run(capsys, "--from", workdir, "--prompt", "Thou art", "--temperature", 0,
                       "--max_new_tokens", NEW)
  assert (code, err) == (0, "")
  (want,) = expected(model, ["Thou art"], eos_id=256)
  assert out == printable(want) + "\n"


def test_a_files_prompts_continue_in_one_batch_each_under_its_header(capsys, workdir, model,
                                                                     tmp_path, monkeypatch):
  prompts = ["Thou", "my lord and I", "the king\adoth"]  # lengths differ: one padded batch
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  calls = []
  monkeypatch.setattr(generate_cli, "generate",
                      lambda model, tokens, *a, **k: calls.append(len(tokens))
                      or generate(model, tokens, *a, **k))
  code, out, _ = run(capsys, "--from", workdir, "--prompts_file", tmp_path / "prompts.txt",
                     "--temperature", 0, "--max_new_tokens", NEW)
  assert code == 0 and calls == [3]
  want = expected(model, prompts, eos_id=256)
  assert out == "\n".join(f"==> prompt {i} of 3: {printable(p)} <==\n{printable(w)}\n"
                          for i, (p, w) in enumerate(zip(prompts, want), 1))
  assert "king\\x07doth" in out  # the prompt's control character escaped in its header


def test_a_seed_reproduces_its_draws_and_another_seed_draws_others(capsys, workdir, model):
  sample = lambda seed: run(capsys, "--from", workdir, "--prompt", "Thou art", "--seed", seed,
                            "--temperature", 1.5, "--max_new_tokens", NEW, "--no-eos")[1]
  first, again, other = sample(3), sample(3), sample(4)
  assert first == again != other
  (want,) = expected(model, ["Thou art"], temperature=1.5, seed=3)
  assert first == printable(want) + "\n"


@pytest.mark.parametrize("flags, settings", [
    ([], dict(temperature=0.8, top_k=None, top_p=None, seed=0, eos_id=256)),  # the defaults
    (["--temperature", 1.5, "--top_k", 20, "--top_p", 0.5, "--seed", 3, "--no-eos"],
     dict(temperature=1.5, top_k=20, top_p=0.5, seed=3, eos_id=None)),
])
def test_the_sampling_flags_are_generates_settings(capsys, workdir, monkeypatch, flags,
                                                   settings):
  calls = []
  monkeypatch.setattr(generate_cli, "generate", lambda model, tokens, new, **given: calls.append(
      (new, given)) or [np.zeros(1, np.int32)])
  assert run(capsys, "--from", workdir, "--prompt", "x", "--max_new_tokens", NEW, *flags)[0] == 0
  assert calls == [(NEW, settings)]


def test_a_hugging_face_folder_decodes_with_its_tokenizer_and_stops_at_its_eos(capsys,
                                                                               tmp_path):
  folder = hf_folder(tmp_path)
  loaded = inference.load(folder)
  prompt = loaded.tokenizer.encode("thou art")
  (free,) = generate(loaded.model, [prompt], NEW)
  greedy = lambda *flags: run(capsys, "--from", folder, "--prompt", "thou art", "--temperature",
                              0, "--max_new_tokens", NEW, *flags)[1]
  # The tokens decoded after the prompt: sentencepiece's space before a word stays.
  assert "thou art" + greedy("--no-eos") == loaded.tokenizer.decode(
      np.concatenate([prompt, free])) + "\n"
  # The end-of-text token made the third greedy token (tokenizer_config.json names it).
  eos = loaded.tokenizer._tokenizer.id_to_token(int(free[2]))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
  stop = list(free).index(free[2]) + 1
  assert "thou art" + greedy() == loaded.tokenizer.decode(
      np.concatenate([prompt, free[:stop]])) + "\n"
  assert stop < NEW


@pytest.fixture
def blank_line_file(tmp_path):
  (tmp_path / "prompts.txt").write_text("Thou\n\nart\n")
  return tmp_path / "prompts.txt"


# (arguments after --from WORKDIR, the one line's text after "mhc-generate: "); WORKDIR reads
# at most SEQ_LEN tokens (bytes).
BAD_INPUTS = [
    (["--prompt", "x" * (SEQ_LEN + 1)], f"ValueError: --prompt has {SEQ_LEN + 1} tokens, more "
     f"than the model's context of {SEQ_LEN}"),
    (["--prompt", "x" * 20, "--max_new_tokens", SEQ_LEN - 18], "ValueError: --prompt has 20 "
     f"tokens: with --max_new_tokens {SEQ_LEN - 18} the model reads {SEQ_LEN + 1}, more than "
     f"its context of {SEQ_LEN}; lower --max_new_tokens or shorten the prompt"),
    (["--prompt", ""], "ValueError: --prompt is empty: a prompt needs some text to continue"),
    (["--prompts_file", "BLANK_LINE_FILE"], "ValueError: --prompts_file line 2 is empty: a "
     "prompt needs some text to continue"),
    (["--prompt", "x", "--max_new_tokens", 0], "argument --max_new_tokens: must be an int >= 1, "
     "got '0'"),
    (["--prompt", "x", "--temperature", -0.5], "argument --temperature: must be a number >= 0 "
     "(0: greedy), got '-0.5'"),
    (["--prompt", "x", "--top_p", 0], "argument --top_p: must be a number in (0, 1], got '0'"),
    (["--prompt", "x", "--top_p", 1.5], "argument --top_p: must be a number in (0, 1], got "
     "'1.5'"),
    (["--prompt", "x", "--top_k", 0], "argument --top_k: must be an int >= 1, got '0'"),
    (["--prompt", "x", "--top_k", "many"], "argument --top_k: must be an int >= 1, got 'many'"),
    (["--prompt", "x", "--temperature", 0, "--top_k", 5], "--top_k and --top_p shape sampling: "
     "give them a --temperature > 0 (0 is greedy)"),
    (["--prompt", "x", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16' "
     "(choose from 'float32', 'bfloat16')"),
    ([], "one of the arguments --prompt --prompts_file is required"),
    (["--prompt", "x", "--prompts_file", "BLANK_LINE_FILE"], "argument --prompts_file: not "
     "allowed with argument --prompt"),
]


@pytest.mark.parametrize("args, line", BAD_INPUTS)
def test_each_bad_input_is_one_line_naming_the_argument_and_exit_2(capsys, workdir,
                                                                   blank_line_file, args, line):
  args = [blank_line_file if arg == "BLANK_LINE_FILE" else arg for arg in args]
  assert run(capsys, "--from", workdir, *args) == (2, "", f"mhc-generate: {line}\n")


def test_a_prompt_and_continuation_that_just_fit_the_context_run(capsys, workdir, model):
  # The last new token is drawn, never read: SEQ_LEN - 20 + 1 new tokens after 20 fit.
  new = SEQ_LEN - 19
  out = run(capsys, "--from", workdir, "--prompt", "x" * 20, "--max_new_tokens", new,
            "--temperature", 0, "--no-eos")[1]
  assert out == printable(expected(model, ["x" * 20], new)[0]) + "\n"


@pytest.mark.parametrize("source, line", [
    ("missing", "ValueError: --from {} is not a directory"),
    (".", "ValueError: --from {} holds no config.json: neither a Hugging Face checkpoint nor an "
     "mhc-train workdir"),
])
def test_a_from_that_is_neither_a_workdir_nor_a_hugging_face_folder_is_one_line(
    capsys, tmp_path, source, line):
  path = (tmp_path / source).resolve()
  assert run(capsys, "--from", path, "--prompt", "x") == (
      2, "", f"mhc-generate: {line.format(path)}\n")


@pytest.mark.parametrize("content, problem", [(b"", "holds no prompt: write one a line"),
                                              (b"Thou \xff\n", "is not UTF-8 text")])
def test_a_prompts_file_of_no_prompt_or_not_utf8_is_one_line(capsys, workdir, tmp_path,
                                                             content, problem):
  (tmp_path / "prompts.txt").write_bytes(content)
  assert run(capsys, "--from", workdir, "--prompts_file", tmp_path / "prompts.txt") == (
      2, "", f"mhc-generate: ValueError: --prompts_file {tmp_path / 'prompts.txt'} {problem}\n")


def test_a_missing_prompts_file_is_one_line_before_the_model_loads(capsys, tmp_path,
                                                                   monkeypatch):
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("loaded the model"))
  assert run(capsys, "--from", tmp_path, "--prompts_file", tmp_path / "none.txt") == (
      2, "", f"mhc-generate: ValueError: --prompts_file {tmp_path / 'none.txt'} is not a "
      "file\n")


def test_the_installed_command_prints_the_continuation_and_nothing_else(workdir, model):
  command = pathlib.Path(sys.executable).parent / "mhc-generate"
  proc = subprocess.run([command, "--from", workdir, "--prompt", "Thou art", "--temperature",
                         "0", "--max_new_tokens", str(NEW)], capture_output=True, text=True,
                        timeout=300)
  (want,) = expected(model, ["Thou art"], eos_id=256)
  assert (proc.returncode, proc.stdout, proc.stderr) == (0, printable(want) + "\n", "")


def test_help_describes_the_command(capsys):
  code, out, _ = run(capsys, "--help")
  assert code == 0
  assert generate_cli.__doc__.splitlines()[0] in out and "--prompts_file FILE" in out
