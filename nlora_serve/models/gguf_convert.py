"""Dequantize a GGUF file into a Hugging Face directory, in a process of its own.

    python -m nlora_serve.models.gguf_convert FILE.gguf OUT_DIR SOURCE_SHA256

:func:`nlora_serve.models.resolve.resolve_model` runs this as a child process, so that the server
never imports what the conversion needs: transformers' Llama module imports ``torch._dynamo``,
which imports Triton where it is installed, and in a server that stayed loaded for the process's
life (``gc.freeze`` keeps start-up objects) nanobind printed "leaked ..." lines at its exit. The
child also takes the float32 copy transformers loads with it when it ends.

The child's stdout carries only its error message (anything printed while converting goes to
stderr, with the progress bar: its four steps, each named as it starts, and on a terminal the time
spent redrawn every second, since loading the weights takes most of the time with nothing to count:
a newcomer's first ``make serve`` showed a bar frozen at 25% for 12-50 s); exit 0 converted, 2 a
:class:`ModelError` (its message on stdout), 1 any other failure (its traceback on stderr, its last
line on stdout).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

from nlora_serve.errors import ModelError
from nlora_serve.models.resolve import EXIT_MODEL_ERROR, MARKER
from nlora_serve.models.spec import read_spec
from nlora_serve.models.weights import fingerprint


def convert(gguf: Path, out: Path, digest: str) -> None:
    """Dequantize ``gguf`` to float32 with transformers and save config, weights and tokenizer into
    ``out`` (an existing empty folder); ``digest`` is the file's sha256, recorded in the marker.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the state dict and the
    config are written directly (lm_head is dropped where it is tied to the embeddings).

    Raises:
        ModelError: transformers cannot load the file as a GGUF model (the message names the file
            and transformers' error), or the result is not a model this server runs.
    """
    from tqdm import tqdm

    with tqdm(total=4, desc=f"preparing {gguf.name}", unit="step") as steps, _redrawn(steps):
        _convert_steps(gguf, out, digest, steps)


@contextlib.contextmanager
def _redrawn(bar, every: float = 1.0) -> Iterator[None]:
    """Redraw ``bar`` every ``every`` seconds while the block runs, so that its elapsed time moves
    through a long step; only where stderr is a terminal (in a log file each redraw would add to
    one ever longer line)."""
    if not sys.stderr.isatty():
        yield
        return
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every):
            bar.refresh()

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()


def _convert_steps(gguf: Path, out: Path, digest: str, steps) -> None:
    steps.set_postfix_str("reading the tokenizer", refresh=True)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.set_postfix_str("de-quantizing the weights (the longest step)", refresh=False)
        steps.update()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        steps.set_postfix_str("saving safetensors, config and tokenizer", refresh=False)
        steps.update()
    except Exception as exc:  # transformers raises many types for a bad GGUF file
        raise ModelError(f"{gguf}: cannot load as a GGUF model ({type(exc).__name__}: {exc})") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # GGUF-loaded configs leave it unset
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record_added_tokens(out)
    steps.set_postfix_str("fingerprinting the weights", refresh=False)
    steps.update()
    read_spec(out)
    marker = {"source": str(gguf), "source_sha256": digest, "fingerprint": fingerprint(state)}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    steps.set_postfix_str("done", refresh=False)
    steps.update()


def record_added_tokens(directory: Path) -> None:
    """Write ``tokenizer.json``'s added tokens into ``tokenizer_config.json`` as
    ``added_tokens_decoder`` (id -> the token's content and flags), as transformers 4 saved them.

    transformers 5's ``save_pretrained`` leaves the key out, and without it every
    ``AutoTokenizer.from_pretrained`` parses the whole ``tokenizer.json`` in Python a second time
    (after the Rust tokenizer has read it) only to find that list: 0.25 s of a 0.35 s load for the
    default model's 49,152-token vocabulary. With it, loads take transformers' ordinary path and the
    same tokenizer comes out (tests/models/test_models.py compares the two), in 0.10 s.
    """
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in config:
        return
    added = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    config["added_tokens_decoder"] = {str(entry["id"]): {k: v for k, v in entry.items() if k != "id"}
                                      for entry in added}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run :func:`convert` on ``FILE.gguf OUT_DIR SOURCE_SHA256``; returns the exit status."""
    gguf, out, digest = sys.argv[1:] if argv is None else argv
    reply = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the parent's channel for the error
            convert(Path(gguf), Path(out), digest)
    except ModelError as exc:
        print(exc, file=reply)
        return EXIT_MODEL_ERROR
    except Exception as exc:  # a bug or MemoryError: the traceback for the operator, one line for the parent
        traceback.print_exc()
        print(f"{type(exc).__name__}: {exc}", file=reply)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
