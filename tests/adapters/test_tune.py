"""IntTune (``adapters tune``): loss drops, only N trains, zeros start at the base, the written
tied adapter reproduces the trained model, same seed → same N, and the CLI.

The toy task: every prompt asks for the code word and every response is the same string, so a few
steps on r=4 q_proj/v_proj must cut the held-out loss (on unseen prompts) by far more than 20%.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from adapter_helpers import file_deltas, merged
from nlora_serve.adapters.loader import read_adapter
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.tune.train import TuneConfig, attach, cosine_schedule, tune
from nlora_serve.adapters.tune.data import IGNORE, encode, read_examples
from nlora_serve.cli import main as cli_main
from nlora_serve.errors import AdapterError

R, TARGETS = 4, ["q_proj", "v_proj"]
RESPONSE = "The code word is PINEAPPLE."
CFG = dict(rank=R, targets=TARGETS, n_init="zeros", lr=0.05, steps=6, batch_size=4, held_out=0.25, seed=3,
           max_len=96)


def _write_data(path, n=16):
    rows = [{"prompt": f"Request {i}: what is the code word for box {i * 7}?", "response": RESPONSE}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(base_fp32, hf_model, tmp_path_factory):
    """One tuning run on a private copy of the model: (result, trained model, tmp dir)."""
    tmp = tmp_path_factory.mktemp("tune")
    data = _write_data(tmp / "data.jsonl")
    model = copy.deepcopy(hf_model)
    result = tune(base_fp32, read_examples(data), TuneConfig(**CFG), out_dir=tmp / "tied",
                  full_out_dir=tmp / "full", model=model, progress=False)
    return result, model, tmp


def test_held_out_loss_drops_by_at_least_20_percent(run):
    result = run[0]
    assert result.steps == 6 and result.num_held_out == 4 and result.num_train == 12
    assert result.held_out_after <= 0.8 * result.held_out_before, (result.held_out_before, result.held_out_after)
    assert result.seconds > 0


def test_only_n_is_trained(run, hf_model):
    _, model, _ = run
    base_params = dict(hf_model.named_parameters())
    tuned = {n.replace(".base.", "."): p for n, p in model.named_parameters() if not n.endswith(".N")}
    assert tuned.keys() == base_params.keys()
    assert all(torch.equal(p, base_params[n]) for n, p in tuned.items())  # base weights bitwise unchanged
    modules = [m for name, m in model.named_modules() if name.endswith(tuple(TARGETS))]
    assert len(modules) == 2 * 30
    for m in modules:
        w = m.base.weight
        assert torch.equal(m.A, w[:R, :]) and torch.equal(m.B, w[:, :R])
        assert m.A.data_ptr() == w.data_ptr()  # a view of W, not a copy
        assert m.N.requires_grad and m.N.abs().sum() > 0  # moved away from its zeros start
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if n.endswith(".N")]


def test_zeros_init_starts_exactly_at_the_base_model(base_fp32, hf_model):
    model = copy.deepcopy(hf_model)
    attach(model, init_adapter(base_fp32, rank=R, targets=TARGETS), "zeros")
    ids = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hf_model(ids).logits)


def test_written_adapter_is_tied_and_reproduces_the_trained_model(run, base_fp32, hf_model):
    result, model, tmp = run
    back = read_adapter(tmp / "tied", base_fp32)
    assert back.is_tied and back.flavour == "inttune-tied"
    assert back.family_key == init_adapter(base_fp32, rank=R, targets=TARGETS).family_key
    assert back.content_hash == result.adapter.content_hash
    stored = load_file(str(tmp / "tied" / "adapter_model.safetensors"))
    assert len(stored) == 60 and all(k.endswith(".lora_N.weight") for k in stored)
    # Independent float64 merge from the full-form files: W + s·B·N·A against the training module.
    deltas, _ = file_deltas(tmp / "full")
    modules = dict(model.named_modules())
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(0))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.self_attn.v_proj"):
        w = modules[name].base.weight.to(torch.float64)
        want = x.double() @ (w + deltas[name]).T
        torch.testing.assert_close(modules[name](x).double(), want, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 2]])
    with torch.no_grad(), merged(copy.deepcopy(hf_model), deltas) as ref:
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-3)


def tune_main(argv: list[str]) -> int:
    """``nlora-serve adapters tune ...`` in this process."""
    return cli_main(["adapters", *argv])


def test_same_seed_gives_the_same_n_through_the_cli(run, base_model_dir, tmp_path):
    result, _, tmp = run
    argv = ["tune", "--model", str(base_model_dir), "--data", str(tmp / "data.jsonl"), "--out", str(tmp_path / "cli"),
            "--rank", str(R), "--targets", *TARGETS, "--n-init", "zeros", "--lr", "0.05", "--steps", "6",
            "--batch-size", "4", "--held-out", "0.25", "--seed", "3", "--max-len", "96", "--quiet"]
    assert tune_main(argv) == 0
    again = load_file(str(tmp_path / "cli" / "adapter_model.safetensors"))
    first = load_file(str(tmp / "tied" / "adapter_model.safetensors"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert tune_main(argv) == 2  # the output directory now holds an adapter: refused, not overwritten


def test_encode_labels_only_the_assistant_turns(base_fp32):
    tok = base_fp32.tokenizer()
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]
    ids, labels = encode(tok, chat, 512)
    assert len(ids) == len(labels)
    assert ids == tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False).input_ids
    trained = tok.decode([t for t in labels if t != IGNORE])
    assert trained == "Hello there.<|im_end|>\nGoodbye!<|im_end|>\n"
    assert encode(tok, chat, 10) == (ids[:10], labels[:10])


def test_read_examples_accepts_both_shapes_and_names_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "response": "b"}\n\n'
                    '{"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}\n')
    assert read_examples(good) == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                   [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"messages": [{"role": "user", "content": "c"}]}\n')
    with pytest.raises(AdapterError, match=r"bad.jsonl:2"):
        read_examples(bad)
    deep = tmp_path / "deep.jsonl"  # nested past Python's JSON parser: an AdapterError, not a RecursionError
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(AdapterError, match=r"deep.jsonl:1: not JSON"):
        read_examples(deep)
    first = tmp_path / "first.jsonl"  # an assistant turn with nothing before it: named, not a template ValueError
    first.write_text('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},'
                     ' {"role": "assistant", "content": "c"}]}\n')
    with pytest.raises(AdapterError, match=r"first.jsonl:1: the first turn is the assistant's"):
        read_examples(first)
    binary = tmp_path / "binary.jsonl"  # not UTF-8: an AdapterError, not a UnicodeDecodeError
    binary.write_bytes(b"\xff\xfe\n")
    with pytest.raises(AdapterError, match=r"binary.jsonl: cannot read training data .*utf-8"):
        read_examples(binary)


def test_a_line_of_other_keys_shows_both_shapes_as_json_and_names_its_keys(tmp_path):
    # h130: {"prompt", "answer"} got '... {"messages": [...]}} with an assistant turn' (a stray brace, its keys unnamed)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(AdapterError) as err:
        read_examples(bad)
    assert str(err.value) == (f'{bad}:1: expected {{"prompt": str, "response": str}} or {{"messages": [{{"role": str, '
                              '"content": str}, ...]} with an assistant turn; got keys \'prompt\', \'answer\'')


def test_training_data_that_is_no_regular_file_or_too_large_is_refused_before_reading(tmp_path, monkeypatch):
    """`--data /dev/zero` read until killed (a hostile tester's find): devices, folders and files
    past the size cap are refused by name, without reading a byte."""
    with pytest.raises(AdapterError, match=r"/dev/zero: training data must be a regular JSONL file, not a device"):
        read_examples("/dev/zero")
    with pytest.raises(AdapterError, match=r"not a folder"):
        read_examples(tmp_path)
    with pytest.raises(AdapterError, match=r"missing.jsonl: no such training data file"):
        read_examples(tmp_path / "missing.jsonl")
    big = tmp_path / "big.jsonl"
    big.write_text('{"prompt": "a", "response": "b"}\n' * 4)  # 4 lines of 33 bytes
    monkeypatch.setattr("nlora_serve.adapters.tune.data.MAX_DATA_BYTES", 100)
    with pytest.raises(AdapterError, match=r"big.jsonl: training data is 132 bytes; at most 100 are read"):
        read_examples(big)


def test_config_validation_and_schedule():
    with pytest.raises(AdapterError, match="n_init"):
        TuneConfig(n_init="random")
    with pytest.raises(AdapterError, match="batch_size"):
        TuneConfig(batch_size=0)
    for alpha in (0, 0.0, -8, float("nan"), float("inf")):  # at 0 the delta is 0: nothing trained (h143)
        with pytest.raises(AdapterError, match=r"alpha = .*expected a finite number > 0"):
            TuneConfig(alpha=alpha)
    assert TuneConfig(alpha=0.5).alpha == 0.5
    f = cosine_schedule(warmup=2, total=10)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)


@pytest.mark.parametrize("argv", [["--out", ""], ["--out", "x", "--also-full-form", " "]])
def test_an_empty_output_path_is_a_usage_error_before_any_work(argv, capsys, tmp_path):
    # a hostile tester's find: --out '' is Path('.'), so convert and compress wrote into the cwd
    with pytest.raises(SystemExit) as exit_:
        tune_main(["tune", "--data", str(tmp_path / "missing.jsonl"), *argv])
    assert exit_.value.code == 2 and "must name a folder; got an empty path" in capsys.readouterr().err


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        tune_main(["tune", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--out", "--rank", "--targets", "--n-init", "--alpha", "--lr", "--epochs",
                 "--steps", "--batch-size", "--grad-accum", "--warmup", "--held-out", "--seed", "--max-len",
                 "--also-full-form", "--unlikely-tokens", "--unlikelihood-weight"):
        assert flag in text


def test_a_max_len_that_cuts_every_response_is_named_before_the_model_loads(base_fp32, tmp_path, monkeypatch):
    # was "0 example(s) cannot give a held-out split", after loading the model, with 16 examples given
    import nlora_serve.adapters.tune.train as tune_module

    monkeypatch.setattr(tune_module, "load_hf_model", lambda *a: pytest.fail("the model loaded first"))
    examples = read_examples(_write_data(tmp_path / "data.jsonl"))
    prompt = next(i for i, t in enumerate(encode(base_fp32.tokenizer(), examples[0], None)[1]) if t != IGNORE)
    with pytest.raises(AdapterError) as err:
        tune(base_fp32, examples, TuneConfig(**{**CFG, "max_len": 8}), out_dir=tmp_path / "out")
    assert str(err.value).startswith("max_len 8 (--max-len) cuts every one of the 16 example(s) before its response")
    assert f"shortest prompt is {prompt} tokens" in str(err.value) and not (tmp_path / "out").exists()
