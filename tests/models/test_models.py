"""The default model's conversion, the cache root, and the errors for bad model paths."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nlora_serve.errors import ModelError
from nlora_serve.models import (cache_root, fingerprint, load_weights, read_spec, resolve_dtype,
                                resolve_model)
from nlora_serve.models import resolve
from nlora_serve.models.cache import models_dir
from nlora_serve.models.resolve import MARKER


def test_converted_default_model_reproduces_recorded_greedy_tokens(hf_model, base_greedy):
    # The references suppress EOS for all 24 steps (min_new_tokens), as the cases README records.
    for ref in base_greedy:
        ids = torch.tensor([ref["prompt_token_ids"]])
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                min_new_tokens=24, do_sample=False)
        assert out[0, ids.shape[1]:].tolist() == ref["greedy_token_ids"]


def test_default_model_spec_and_fingerprint(base_model_dir):
    spec = read_spec(base_model_dir)
    assert (spec.architecture, spec.num_layers, spec.hidden_size) == ("LlamaForCausalLM", 30, 576)
    assert spec.projection_shape("k_proj") == (192, 576)
    assert spec.projection_shape("down_proj") == (576, 1536)
    recorded = json.loads((base_model_dir / MARKER).read_text())["fingerprint"]
    assert recorded == fingerprint(load_weights(base_model_dir))


def test_a_second_process_waits_for_the_first_conversion_and_loads_its_copy(tmp_path, monkeypatch, caplog):
    # Two servers (or parallel test workers) starting on a fresh cache: the second used to convert
    # too, then delete the first's finished folder while the first was loading from it.
    gguf, root = tmp_path / "m.gguf", tmp_path / "cache"
    gguf.write_bytes(b"GGUF and not much else")
    target = models_dir(root) / f"m-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:12]}"
    models_dir(root).mkdir(parents=True)
    converted = []
    monkeypatch.setattr(resolve, "_convert", lambda src, out, digest: converted.append(out))
    holder = subprocess.Popen(  # another process, converting: it holds the lock until told
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.readline()", str(models_dir(root))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        got = {}
        with caplog.at_level(logging.INFO, logger=resolve.__name__):
            waiter = threading.Thread(target=lambda: got.update(path=resolve._prepared_gguf(gguf, root)))
            waiter.start()
            deadline = time.monotonic() + 10
            while "waiting for another process" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "waiting for another process" in caplog.text and waiter.is_alive()
            target.mkdir()  # the other process's conversion lands, then it lets go
            (target / MARKER).write_text("{}")
            holder.stdin.write("\n")
            holder.stdin.flush()
            waiter.join(10)
    finally:
        holder.kill()
        holder.wait()
    assert got["path"] == target and converted == []  # its copy, not converted a second time
    assert (target / MARKER).read_text() == "{}"


def test_fingerprint_matches_hand_computed_sha256():
    a = torch.tensor([1.0, 2.0], dtype=torch.float32)
    b = torch.tensor([[3]], dtype=torch.int64)
    h = hashlib.sha256()
    h.update(b"a|torch.float32|(2,)\n" + a.numpy().tobytes())
    h.update(b"b|torch.int64|(1, 1)\n" + b.numpy().tobytes())
    assert fingerprint({"b": b, "a": a}) == h.hexdigest()
    assert fingerprint({"a": a + 1e-6, "b": b}) != h.hexdigest()


def test_missing_model_path_names_path_and_expectation(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelError, match=r"nope: no such model; expected 'default', a Hugging Face"):
        resolve_model(str(missing), tmp_path / "cache")


# what the conversion's transformers model classes import: torch._dynamo, and through it Triton
# where it is installed (nanobind then printed "leaked ..." lines as the server exited)
CONVERSION_STACK = ("transformers", "gguf", "torch._dynamo", "triton")


def test_corrupt_gguf_is_refused_in_the_converters_process_and_leaves_no_partial_directory(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"definitely not gguf" * 100)
    # a fresh process as the server is (this one has imported all of them): the conversion runs in a
    # child of it, which refuses the file; its message comes back whole
    script = ("import json, sys\nfrom nlora_serve.errors import ModelError\nfrom nlora_serve.models import resolve_model\n"
              "try:\n    resolve_model(sys.argv[1], sys.argv[2])\nexcept ModelError as exc:\n    error = str(exc)\n"
              f"print(json.dumps([error, sorted(m for m in {CONVERSION_STACK!r} if m in sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", script, str(bad), str(tmp_path / "cache")], capture_output=True,
                          text=True, timeout=120)
    error, imported = json.loads(done.stdout)
    assert error == (f"{bad}: cannot load as a GGUF model (ValueError: {bad} does not start with the GGUF magic "
                     "bytes, so it is not a GGUF file.)"), done.stderr
    assert imported == []
    assert list((tmp_path / "cache" / "models").iterdir()) == []


FAKE_CONVERTERS = {  # what the converter's process does -> the ModelError resolve_model raises
    "print('{gguf}: not a model this server runs'); raise SystemExit(2)": "{gguf}: not a model this server runs",
    "print('RuntimeError: boom'); raise SystemExit(1)":
        "{gguf}: the conversion process failed (exit status 1: RuntimeError: boom; its traceback is on stderr)",
    "import os, signal; os.kill(os.getpid(), signal.SIGKILL)":
        "{gguf}: the conversion process was killed by signal SIGKILL (out of memory?)",
}


@pytest.mark.parametrize("code", FAKE_CONVERTERS)
def test_how_the_converters_process_ends_is_a_model_error_naming_the_file(tmp_path, monkeypatch, code):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "fake_converter.py").write_text(code.format(gguf=gguf))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the child finds it after the package's own root
    monkeypatch.setattr(resolve, "CONVERTER", "fake_converter")
    with pytest.raises(ModelError) as err:
        resolve_model(str(gguf), tmp_path / "cache")
    assert str(err.value) == FAKE_CONVERTERS[code].format(gguf=gguf)
    assert list(models_dir(tmp_path / "cache").iterdir()) == []  # no partial directory either


def test_the_converter_answers_on_stdout_only_with_its_error(monkeypatch, capsys):
    from nlora_serve.models import gguf_convert

    def refuse(gguf, out, digest):
        print("progress")  # anything printed while converting goes to stderr
        raise ModelError(f"{gguf}: refused")

    def crash(gguf, out, digest):
        raise RuntimeError("boom")

    monkeypatch.setattr(gguf_convert, "convert", refuse)
    assert gguf_convert.main(["m.gguf", "out", "0" * 64]) == resolve.EXIT_MODEL_ERROR
    out, err = capsys.readouterr()
    assert (out, err) == ("m.gguf: refused\n", "progress\n")
    monkeypatch.setattr(gguf_convert, "convert", crash)
    assert gguf_convert.main(["m.gguf", "out", "0" * 64]) == 1
    out, err = capsys.readouterr()
    assert out == "RuntimeError: boom\n" and "Traceback" in err and err.endswith("RuntimeError: boom\n")


def test_the_converters_bar_is_redrawn_every_second_on_a_terminal_only(monkeypatch):
    # A newcomer's find (h110): the first `make serve` showed "preparing ...gguf: 25%" frozen for 12 s
    # (50 s on a loaded box) while transformers loaded the weights: nothing moved, nothing said what ran.
    from nlora_serve.models import gguf_convert

    class Bar:
        redraws = 0

        def refresh(self):
            self.redraws += 1

    class Stderr:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    for tty in (True, False):
        bar = Bar()
        monkeypatch.setattr(sys, "stderr", Stderr(tty))
        with gguf_convert._redrawn(bar, every=0.01):
            time.sleep(0.1)
        redraws = bar.redraws
        time.sleep(0.03)
        assert (redraws >= 3) is tty and bar.redraws == redraws  # and none once the block is left


@pytest.mark.parametrize("config, message", [
    ("{not json", r"cannot read config\.json as JSON"),
    (json.dumps({"architectures": ["GPT2LMHeadModel"]}), r"'GPT2LMHeadModel'\] is not supported; expected one of LlamaForCausalLM"),
    (json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}), r"config\.json lacks the field 'num_attention_heads'"),
])
def test_bad_model_directory_errors(tmp_path, config, message):
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelError, match=message):
        resolve_model(str(tmp_path))


def test_directory_with_only_pickled_weights_is_refused(tmp_path, base_model_dir):
    (tmp_path / "config.json").write_text((base_model_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights .*pickled .bin/.pt files are never opened"):
        resolve_model(str(tmp_path))


def test_cli_reports_expected_failures_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nlora_serve.cli", "models", "prepare", "--model",
                           str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"error: {tmp_path / 'missing'}: no such model" in proc.stderr


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NLORA_SERVE_CACHE", raising=False)
    assert cache_root() == tmp_path / "xdg" / "nlora-serve"
    monkeypatch.setenv("NLORA_SERVE_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "flag") == tmp_path / "flag"


def test_resolve_dtype_takes_vllms_spellings_with_vllms_meaning():
    # vLLM 0.32's ModelDType and _STR_DTYPE_TO_TORCH_DTYPE (vllm/config/model.py), written out here
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("float") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    flags = Path("/proc/cpuinfo").read_text().split()
    fast_bf16 = "amx_bf16" in flags or "avx512_bf16" in flags
    assert resolve_dtype("auto", "cpu") is (torch.bfloat16 if fast_bf16 else torch.float32)
    for half in ("half", "float16"):  # no float16 kernels: refused, naming what runs
        with pytest.raises(ValueError, match=f"^--dtype {half}: this engine computes in float32 or bfloat16 only "
                                             r"\(it has no float16 kernels\); use --dtype bfloat16"):
            resolve_dtype(half)
    with pytest.raises(ValueError, match="--dtype must be one of auto, half, float16, bfloat16, float, float32; "
                                         "got 'fp8'"):
        resolve_dtype("fp8")


def test_converted_tokenizer_records_its_added_tokens_and_loads_as_transformers_own_path(base_model_dir, tmp_path):
    # The converter writes tokenizer.json's added tokens into tokenizer_config.json (transformers 5
    # leaves them out, and each load then parses tokenizer.json twice). Reference: the same files
    # without the key, which transformers loads by reading tokenizer.json's list itself.
    from transformers import AutoTokenizer

    config = json.loads((base_model_dir / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["2"]["content"] == "<|im_end|>"
    for name in ("tokenizer.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((base_model_dir / name).read_bytes())
    del config["added_tokens_decoder"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, legacy = AutoTokenizer.from_pretrained(base_model_dir), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.added_tokens_decoder == legacy.added_tokens_decoder
    assert ours.special_tokens_map == legacy.special_tokens_map and ours.all_special_ids == legacy.all_special_ids
    for text in ("<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", " ünïcødé 🤖\t\n <repo_name>x", "<|im_end"):
        ids = legacy(text).input_ids
        assert ours(text).input_ids == ids
        assert ours.decode(ids, skip_special_tokens=True) == legacy.decode(ids, skip_special_tokens=True)
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "<|im_end|> hi"}]
    assert (ours.apply_chat_template(chat, add_generation_prompt=True)
            == legacy.apply_chat_template(chat, add_generation_prompt=True))
