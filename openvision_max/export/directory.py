"""An export directory: writing it (atomically) and reading it back.

    DIR/open_clip_config.json          open_clip's hub-style config (model_cfg + preprocess_cfg)
    DIR/open_clip_model.safetensors    the CLIP towers and logit_scale, open_clip names, float32
    DIR/tokenizer.json, tokenizer_config.json   the BERT-uncased WordPiece for open_clip's HFTokenizer
    DIR/caption_decoder.safetensors    the caption decoder (open_clip block names, see docs/export.md)
    DIR/caption_decoder_config.json    its dimensions, inputs and mask
    DIR/openvision_max_config.yml      the resolved config of the exported model (for load_model / import)

Safetensors are written and read with NumPy (safetensors.numpy), so exporting needs no torch; reading a
PyTorch pickle (`.bin`/`.pth`, e.g. a released model) imports torch lazily.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Optional

import yaml
from etils import epath

from openvision_max.config import config_to_dict
from openvision_max.config.paths import is_remote
from openvision_max.config.schema import Config
from openvision_max.data.tokenizer import BOS_ID, CLS_ID, EOS_ID, PAD_ID, VOCAB_PATH
from openvision_max.export import mapping
from openvision_max.export.open_clip_config import decoder_config, open_clip_config

OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
DECODER_WEIGHTS = "caption_decoder.safetensors"
DECODER_CONFIG = "caption_decoder_config.json"
OUR_CONFIG = "openvision_max_config.yml"
# Where open_clip looks for weights in a local dir, in its order of preference (factory._find_checkpoint_in_dir).
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                "model.pth")


class ExportError(ValueError):
    """An export directory that cannot be written or read; the message is one line."""


def save_tokenizer(directory: pathlib.Path, vocab_path: pathlib.Path = VOCAB_PATH) -> None:
    """Writes the HF tokenizer files open_clip's HFTokenizer loads with AutoTokenizer (offline).

    The same WordPiece as data/tokenizer.py (BERT-uncased: lower-case, accents stripped, CJK split), with
    `[unused0]`/`[unused1]` named as bos/eos so tokenizer_mode 'clips' frames ids as we do.
    """
    from transformers import BertTokenizer  # the export extra; transformers 5 backs it with `tokenizers`

    with open(vocab_path, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True,
                        bos_token="[unused0]", eos_token="[unused1]", pad_token="[PAD]", cls_token="[CLS]")
    ids = (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.cls_token_id)
    if ids != (PAD_ID, BOS_ID, EOS_ID, CLS_ID):  # a vocabulary other than BERT-uncased's
        raise ExportError(f"tokenizer special ids (pad, bos, eos, cls) are {ids}, expected "
                          f"{(PAD_ID, BOS_ID, EOS_ID, CLS_ID)}")
    tok.save_pretrained(str(directory))


def save_safetensors(path: pathlib.Path, state: mapping.State, metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file
    save_file(state, str(path), metadata=metadata)


def umask_modes(directory: pathlib.Path) -> None:
    """`directory` and its entries get the modes a plain mkdir/open would have given: mkdtemp makes the
    directory 0700 and some writers make files 0600, which would leave a shared model directory unreadable to
    the users it is exported for."""
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it; set straight back
    for path in [directory, *directory.iterdir()]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def export_target(export_dir: str | os.PathLike) -> pathlib.Path | epath.Path:
    """`export_dir` as a path (epath for gs://); ExportError unless it is absent or an empty directory."""
    target = epath.Path(export_dir) if is_remote(export_dir) else pathlib.Path(export_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target} already exists and is not an empty directory")
    return target


def write_atomically(target: pathlib.Path | epath.Path, write_files: Callable[[pathlib.Path], None]
                     ) -> pathlib.Path | epath.Path:
    """Runs `write_files(tmp)` in a temporary directory and puts its files at `target` (from export_target):
    locally a sibling renamed into place, for gs:// a local directory uploaded file by file at the end. A
    failure leaves nothing behind under `target`."""
    remote = is_remote(target)
    if not remote:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=None if remote else target.parent))
    try:
        write_files(tmp)
        umask_modes(tmp)
        if remote:
            _upload(tmp, target)
            shutil.rmtree(tmp)
        else:
            if target.exists():
                target.rmdir()  # empty, checked by export_target
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if remote and target.exists():
            target.rmtree()  # a partial upload: nothing half-written stays under export_dir
        raise
    return target


def save_our_config(directory: pathlib.Path, cfg: Config) -> None:
    (directory / OUR_CONFIG).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def write_export(params: Any, cfg: Config, export_dir: str | os.PathLike) -> pathlib.Path:
    """Writes the export of `params` (a tree of arrays fitting `cfg`) to `export_dir`, which must not exist
    or be empty. Files go to a temporary sibling directory renamed into place at the end, so a failure
    leaves nothing behind under `export_dir`."""
    target = export_target(export_dir)
    clip, decoder = mapping.to_open_clip(params, cfg)

    def write_files(tmp: pathlib.Path) -> None:
        (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(open_clip_config(cfg), indent=2) + "\n")
        save_safetensors(tmp / WEIGHTS, clip, {"format": "pt"})
        save_tokenizer(tmp)
        (tmp / DECODER_CONFIG).write_text(json.dumps(decoder_config(cfg), indent=2) + "\n")
        save_safetensors(tmp / DECODER_WEIGHTS, decoder, {"format": "pt"})
        save_our_config(tmp, cfg)
    return write_atomically(target, write_files)


def _upload(local: pathlib.Path, target: epath.Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for f in sorted(local.iterdir()):
        (target / f.name).write_bytes(f.read_bytes())


def load_state(path: pathlib.Path | epath.Path) -> mapping.State:
    """A state dict file as NumPy float arrays: safetensors without torch, PyTorch pickles with it. A gs://
    file is read into memory first (the readers take local files or bytes)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load, load_file
            return load(path.read_bytes()) if is_remote(path) else load_file(str(path))
        import torch  # a PyTorch pickle (.bin/.pth); weights_only refuses arbitrary code
        source = io.BytesIO(path.read_bytes()) if is_remote(path) else str(path)
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, bfloat16 safetensors (no NumPy dtype), a foreign pickle...
        raise ExportError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    # Upcasting bfloat16/float16 to float32 is exact.
    return {k.removeprefix("module."): v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}


def find_weights(directory: pathlib.Path | epath.Path) -> Optional[pathlib.Path | epath.Path]:
    """The CLIP weights file open_clip would pick in `directory` (its preferred names only)."""
    return next((directory / n for n in WEIGHT_NAMES if (directory / n).is_file()), None)


def read_export(directory: str | os.PathLike, *, decoder: bool = True
                ) -> tuple[dict, mapping.State, Optional[mapping.State], Optional[dict]]:
    """(open_clip config, CLIP state, decoder state or None, our resolved config dict or None) of a
    directory in open_clip's local-dir layout: our export, or a released OpenVision PyTorch model.
    The decoder state is None when the directory has none or `decoder` is False (not read)."""
    directory = epath.Path(directory) if is_remote(directory) else pathlib.Path(directory)
    config_path = directory / OPEN_CLIP_CONFIG
    if not config_path.is_file():
        raise ExportError(f"{directory} has no {OPEN_CLIP_CONFIG}: not an open_clip model directory")
    try:
        oc_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"cannot parse {config_path}: {e}") from None
    if "model_cfg" not in oc_config:
        raise ExportError(f"{config_path} has no model_cfg")
    weights = find_weights(directory)
    if weights is None:
        raise ExportError(f"{directory} has no weights file (looked for {', '.join(WEIGHT_NAMES)})")
    decoder_path = directory / DECODER_WEIGHTS
    decoder_state = load_state(decoder_path) if decoder and decoder_path.is_file() else None
    ours = directory / OUR_CONFIG
    our_config = yaml.safe_load(ours.read_text()) if ours.is_file() else None
    return oc_config, load_state(weights), decoder_state, our_config
