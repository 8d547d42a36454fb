"""The prompts file of a pipeline study: a CSV with columns ``prompt`` and ``seed`` (the paper's ``prompts``,
``seeds`` also work); row k is sample id k. Read in whatever encoding a spreadsheet saved it in, every mistake one
line naming the file and the line.
"""
from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path

from ..errors import fail

INT64_MAX = 2**63 - 1


MAX_PROMPTS_BYTES = 256 << 20   # reads stop here: a prompts file is text, a few MB at the paper's scale


def _prompts_text(path: Path) -> str:
    """The text of a prompts CSV: UTF-8 (a BOM is dropped), UTF-16/32 with a BOM (as Excel and Notepad save
    them), else ISO-8859-1 (the paper's CSVs); NUL bytes without a BOM (UTF-16 without its mark, binary) are refused."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROMPTS_BYTES + 1)
    except OSError as e:
        raise fail(f"prompts file {path} cannot be read ({e.strerror or e}); pass a readable CSV") from None
    if len(raw) > MAX_PROMPTS_BYTES:
        raise fail(f"prompts file {path} is larger than {MAX_PROMPTS_BYTES >> 20} MB; pass a CSV with columns "
                   f"prompt,seed")
    for bom, enc in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            try:
                return raw.decode(enc)
            except UnicodeDecodeError:
                raise fail(f"prompts file {path} starts with a {enc.upper()} byte-order mark but is not {enc.upper()} "
                           f"text; save it as UTF-8 CSV") from None
    if b"\0" in raw:
        raise fail(f"prompts file {path} holds NUL bytes: UTF-16 without a byte-order mark, or not text; save it as "
                   f"UTF-8 CSV (e.g. \"CSV UTF-8\" in a spreadsheet's Save As)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("iso-8859-1")


def read_prompts(path: Path) -> tuple[list[str], list[int]]:
    """(prompts, seeds) from a CSV with a header naming ``prompt`` and ``seed`` (or the paper's ``prompts``,
    ``seeds``); encodings as :func:`_prompts_text`. Cheap: every command checks it before loading a model."""
    path = Path(path)
    if not path.is_file():
        raise fail(f"prompts file {path} does not exist; pass a CSV with columns prompt,seed")
    reader = csv.DictReader(io.StringIO(_prompts_text(path), newline=""))
    prompts, seeds = [], []
    try:
        cols = [c.strip() for c in (reader.fieldnames or [])]
        names = {}
        for need in ("prompt", "seed"):
            have = [c for c in (need, need + "s") if c in cols]
            if not have:
                raise fail(f"prompts file {path} has no {need!r} column (columns: {', '.join(cols) or 'none'}); "
                           f"the header must name prompt and seed")
            names[need] = have[0]
        for row in reader:
            line = reader.line_num
            row = {(k or "").strip(): v for k, v in row.items()}
            raw_seed = row.get(names["seed"])
            if raw_seed is None:
                raise fail(f"prompts file {path}, line {line}: no seed (the row has fewer fields than the header); "
                           f"write prompt,seed on every line and quote prompts that hold commas")
            text = str(raw_seed).strip()
            try:
                if len(text) > 40:
                    raise ValueError
                seed = int(text)
            except ValueError:
                raise fail(f"prompts file {path}, line {line}: seed {text[:40]!r}{'…' if len(text) > 40 else ''} is "
                           f"not an integer; seeds are whole numbers from 0 to {INT64_MAX}") from None
            if seed < 0:                      # torch generators take int64 seeds: fail here, not mid-capture
                raise fail(f"prompts file {path}, line {line}: seed {seed} is negative; use a seed from 0 to "
                           f"{INT64_MAX}")
            if seed > INT64_MAX:
                raise fail(f"prompts file {path}, line {line}: seed {seed} is above the largest seed {INT64_MAX} "
                           f"(2**63 - 1); use a smaller seed")
            seeds.append(seed)
            prompts.append(row[names["prompt"]] or "")
    except csv.Error as e:
        line = reader.line_num + 1                                   # the record being read started here
        why = (f"a field is longer than {csv.field_size_limit()} characters; close an unclosed quote (\") on or "
               f"before that line, or shorten the prompt (the text encoder reads only its first 77 tokens)"
               if "field limit" in str(e) else f"not valid CSV ({e}); fix that line")
        raise fail(f"prompts file {path}, line {line}: {why}") from None
    if not prompts:
        raise fail(f"prompts file {path} has no rows below its header")
    return prompts, seeds
