"""The docs cannot rot silently (issue 22): every name the README and ``docs/*.md`` give in code exists.

What is checked, in code only (inline backticks and fenced blocks; prose is free text):

* ``sceneprobe <command>``: a subcommand of :func:`sceneprobe.cli.build_parser`;
* ``--flag``: an option of the command before it on the same line (of any subcommand when no command precedes it);
  after ``benchmarks/bench_x.py`` an option that script declares; after ``accelerate``/``pip``/``pytest``/… unchecked;
* ``section.key`` and ``section: {key: …}`` (and YAML blocks): a field of the config dataclasses (:class:`Config`);
* ``sceneprobe.module.name``: an importable module (or an attribute of one);
* file paths from the repository root (``src/…``, ``benchmarks/…``, ``tests/…``, ``docs/…``, ``.ci/…``,
  ``Makefile``…), ``pretrained/…`` and ``presets/…`` (inside ``src/sceneprobe``), any ``….py``, and markdown
  links: they exist;
* ``make <target>``: a target of the Makefile; ``bench_*.py``: a script in ``benchmarks/``.

A span starting with ``error:`` quotes a message and is not checked.

And the other way round: every key of the config dataclasses has a row in ``docs/configuration.md`` whose default
and preset values are the code's and the presets' (so a new or changed key cannot go undocumented).

The checker itself is tested on planted mistakes, so a check that stopped finding anything would fail here.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from sceneprobe.cli import build_parser
from sceneprobe.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 130          # the "≤ ~120 lines", with a little slack

ROOT_PREFIXES = ("src/", "benchmarks/", "tests/", "docs/", ".ci/")
ROOT_FILES = ("Makefile", "README.md", "pyproject.toml")
PACKAGE_PREFIXES = ("pretrained/", "presets/")                 # short forms for src/sceneprobe/<…>
FILE_SUFFIXES = {"html", "md", "csv", "json", "jsonl", "png", "py", "yaml", "yml", "txt", "safetensors", "pt", "log",
                 "lock", "sh"}
NOT_KEYS = {"vae.enc", "vae.dec", "unet.mid"}                  # site-name prefixes, not config keys
OTHER_TOOLS = {"accelerate", "pip", "pytest", "torchrun", "git", "time", "nvidia-smi", "printf", "bash"}
STRIP = "`'\"[](){},;:.!?…"


# ------------------------------------------------------------------------------------------------ what the docs name
def code_snippets(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, is_yaml_block) for each fenced-block line (``\\``-continued lines joined) and each inline
    code span of ``text``."""
    out, fence, lang, buf, start, prose = [], False, "", "", 0, {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fence and lang in ("yaml", "yml") and buf:
                out.append((start, buf, True))
            fence, lang, buf = not fence, line.strip()[3:].strip(), ""
            continue
        if fence:
            if lang in ("yaml", "yml"):
                buf, start = (buf + line + "\n", start or n)
                continue
            joined = buf + line
            if joined.rstrip().endswith("\\"):
                buf, start = joined.rstrip()[:-1] + " ", start or n
                continue
            out.append((start or n, joined, False))
            buf, start = "", 0
        else:
            prose[n] = line
    # inline spans may wrap: read each paragraph as one text, a span's line is where it starts
    para: list[tuple[int, str]] = []
    for n in [*sorted(prose), None]:
        if n is not None and prose[n].strip() and (not para or para[-1][0] == n - 1):
            para.append((n, prose[n]))
            continue
        joined = "\n".join(ln for _, ln in para)
        for m in re.finditer(r"`([^`]+)`", joined):
            out.append((para[0][0] + joined.count("\n", 0, m.start()), " ".join(m.group(1).split()), False))
        para = [(n, prose[n])] if n is not None and prose[n].strip() else []
    return sorted(out, key=lambda x: x[0])


def markdown_links(text: str) -> list[tuple[int, str]]:
    return [(n, m.group(1)) for n, line in enumerate(text.splitlines(), 1)
            for m in re.finditer(r"\]\(([^)\s]+)\)", line)]


# --------------------------------------------------------------------------------------------- what the code offers
def parser_options() -> tuple[dict[str, set[str]], set[str]]:
    """{subcommand: its option strings} and the top-level parser's option strings."""
    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    opts = {name: {o for a in sp._actions for o in a.option_strings} for name, sp in sub.choices.items()}
    return opts, {o for a in p._actions for o in a.option_strings}


def config_fields() -> dict[str, set[str]]:
    """{section: its keys} of :class:`Config` (``preset`` is a top-level key)."""
    root = Config()
    return {f.name: {g.name for g in dataclasses.fields(getattr(root, f.name))}
            for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(root, f.name))}


def make_targets(makefile: Path = ROOT / "Makefile") -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([A-Za-z_][\w-]*)\s*:(?!=)", makefile.read_text(), re.M)}


# ------------------------------------------------------------------------------------------------------- the checker
class Checker:
    def __init__(self, root: Path = ROOT):
        self.root = root
        self.commands, self.top_options = parser_options()
        self.any_option = set().union(*self.commands.values()) | self.top_options
        self.sections = config_fields()
        self.targets = make_targets(root / "Makefile")
        self._bench_src: dict[str, str] = {}

    # one doc -------------------------------------------------------------------------------------------------------
    def problems(self, text: str, doc: Path = ROOT / "README.md") -> list[str]:
        out: list[str] = []
        for n, code, is_yaml in code_snippets(text):
            where = f"{doc.name}:{n}"
            if is_yaml:
                out += self._yaml(code, where)
                continue
            if code.startswith("error:"):                # a quoted error line: words, not a command
                continue
            out += self._commands(code, where)
            out += self._inline_yaml(code, where)
            for tok in code.split():
                out += self._token(tok.strip(STRIP) if not tok.startswith(".") else tok.rstrip(STRIP), where)
        for n, target in markdown_links(text):
            if "://" in target or target.startswith(("#", "mailto:")):
                continue
            path = target.split("#")[0]
            if path and not (doc.parent / path).exists():
                out.append(f"{doc.name}:{n}: link {target} points to no file")
        return out

    def _commands(self, code: str, where: str) -> list[str]:
        out, ctx, toks = [], None, code.split()
        for i, raw in enumerate(toks):
            tok = raw.strip(STRIP)
            nxt = toks[i + 1].strip(STRIP) if i + 1 < len(toks) else ""
            if tok == "sceneprobe" or tok.endswith("/sceneprobe"):
                if re.fullmatch(r"[a-z][a-z-]*", nxt):
                    if nxt not in self.commands:
                        out.append(f"{where}: `sceneprobe {nxt}` is not a command (known: {', '.join(self.commands)})")
                    ctx = ("cli", nxt if nxt in self.commands else None)
                else:
                    ctx = ("cli", None)
            elif tok == "make" and nxt and re.fullmatch(r"[a-z][\w-]*", nxt):
                if nxt not in self.targets:
                    known = ", ".join(sorted(self.targets))
                    out.append(f"{where}: `make {nxt}` is not a Makefile target (known: {known})")
                ctx = ("other", "make")
            elif re.search(r"bench_\w+\.py$", tok):
                ctx = ("bench", re.search(r"bench_\w+\.py$", tok).group(0))
            elif tok in OTHER_TOOLS or tok.endswith("/pip"):
                ctx = ("other", tok)
            elif re.fullmatch(r"--[a-z][a-z0-9_-]*(=\S*)?", tok):
                flag = tok.split("=")[0]
                out += self._flag(flag, ctx, where)
        return out

    def _flag(self, flag: str, ctx, where: str) -> list[str]:
        if flag == "--help":
            return []
        if ctx is None or (ctx[0] == "cli" and ctx[1] is None):
            ok, what = flag in self.any_option, "any sceneprobe command"
        elif ctx[0] == "cli":
            ok, what = flag in self.commands[ctx[1]], f"`sceneprobe {ctx[1]}`"
        elif ctx[0] == "bench":
            src = self._bench(ctx[1])
            ok, what = src is None or f'"{flag}"' in src or f"'{flag}'" in src, f"benchmarks/{ctx[1]}"
        else:
            return []
        return [] if ok else [f"{where}: option {flag} is not an option of {what}"]

    def _bench(self, name: str) -> str | None:
        if name not in self._bench_src:
            p = self.root / "benchmarks" / name
            self._bench_src[name] = p.read_text() if p.is_file() else None
        return self._bench_src[name]

    def _token(self, tok: str, where: str) -> list[str]:
        if not tok or any(c in tok for c in "<>{}*…$"):
            return self._glob_token(tok, where) if "*" in tok or "<" in tok else []
        m = re.fullmatch(r"([a-z_]+)\.([a-z_0-9]+)(\[\d+\])?", tok)
        if m and m.group(1) in self.sections and tok not in NOT_KEYS and m.group(2) not in FILE_SUFFIXES:
            if m.group(2) not in self.sections[m.group(1)]:
                return [f"{where}: config key {m.group(1)}.{m.group(2)} does not exist"]
            return []
        if re.fullmatch(r"sceneprobe(\.\w+)+", tok):
            return [] if _resolves(tok) else [f"{where}: {tok} is not an importable module or attribute"]
        if re.fullmatch(r"(benchmarks/)?bench_\w+\.py", tok):
            p = self.root / "benchmarks" / tok.split("/")[-1]
            return [] if p.is_file() else [f"{where}: benchmark {tok} does not exist"]
        return self._path(tok, where)

    def _glob_token(self, tok: str, where: str) -> list[str]:
        if not tok.startswith(ROOT_PREFIXES + PACKAGE_PREFIXES) or "{" in tok or "…" in tok or "$" in tok:
            return []
        pat = re.sub(r"<[^>]*>", "*", tok)
        base = self.root / "src" / "sceneprobe" if tok.startswith(PACKAGE_PREFIXES) else self.root
        return [] if list(base.glob(pat.rstrip("/"))) else [f"{where}: no file matches {tok}"]

    def _path(self, tok: str, where: str) -> list[str]:
        if "/" not in tok and not tok.endswith(".py") and tok not in ROOT_FILES:
            return []
        if "://" in tok or tok.startswith(("~", "/", "$")):
            return []
        if tok.startswith(ROOT_PREFIXES) or tok in ROOT_FILES:
            cands = [self.root / tok]
        elif tok.startswith(PACKAGE_PREFIXES):
            cands = [self.root / "src" / "sceneprobe" / tok]
        elif tok.endswith(".py") and re.fullmatch(r"[\w/.]+", tok):
            if "/" in tok:
                cands = [self.root / tok, self.root / "src" / "sceneprobe" / tok]
            else:
                cands = [*(self.root / "src" / "sceneprobe").rglob(tok), *(self.root / "benchmarks").rglob(tok),
                         *(self.root / "tests").glob(tok)] or [self.root / "src" / "sceneprobe" / tok]
        else:
            return []
        return [] if any(c.exists() for c in cands) else [f"{where}: file {tok} does not exist"]

    def _inline_yaml(self, code: str, where: str) -> list[str]:
        out = []
        for m in re.finditer(r"\b([a-z_]+):\s*\{([^{}]*)\}", code):
            if m.group(1) not in self.sections:
                continue
            for key in re.findall(r"(?:^|,)\s*([a-z_]+)\s*:", m.group(2)):
                if key not in self.sections[m.group(1)]:
                    out.append(f"{where}: config key {m.group(1)}.{key} does not exist")
        return out

    def _yaml(self, code: str, where: str) -> list[str]:
        try:
            data = yaml.safe_load(code) or {}
        except yaml.YAMLError as e:
            return [f"{where}: YAML block does not parse ({str(e).splitlines()[0]})"]
        if not isinstance(data, dict):
            return []
        out = []
        for sec, keys in data.items():
            if sec == "preset":
                continue
            if sec not in self.sections:
                out.append(f"{where}: config section {sec} does not exist")
            elif isinstance(keys, dict):
                out += [f"{where}: config key {sec}.{k} does not exist" for k in keys if k not in self.sections[sec]]
        return out


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            continue
        if i == len(parts):
            return True
        obj = importlib.import_module(name)
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker()


# -------------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_name_in_the_docs_exists(checker, doc):
    problems = checker.problems(doc.read_text(), doc)
    assert not problems, "\n".join(problems)


def test_readme_is_short_and_maps_every_docs_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    linked = {Path(t.split("#")[0]).name for _, t in markdown_links(text)}
    assert {p.name for p in DOCS[1:]} <= linked, "every docs/*.md page is linked from the README's docs map"


def test_the_checker_finds_planted_mistakes(checker):
    """Each line plants one wrong name; each must be reported (a checker that finds nothing fails here)."""
    planted = {
        "`sceneprobe frobnicate --out x`": "`sceneprobe frobnicate` is not a command",
        "`sceneprobe run --no-such-flag`": "option --no-such-flag is not an option of `sceneprobe run`",
        "`sceneprobe sample --prompts p.csv`": "option --prompts is not an option of `sceneprobe sample`",
        "`--never-an-option`": "option --never-an-option is not an option of any sceneprobe command",
        "`probe.no_such_key`": "config key probe.no_such_key does not exist",
        "`capture: {steps: 15, no_such_key: 1}`": "config key capture.no_such_key does not exist",
        "`src/sceneprobe/no_such_module.py`": "file src/sceneprobe/no_such_module.py does not exist",
        "`pretrained/cpu/no_such_file.json`": "file pretrained/cpu/no_such_file.json does not exist",
        "`sceneprobe.no_such_module`": "sceneprobe.no_such_module is not an importable module",
        "`make deploy`": "`make deploy` is not a Makefile target",
        "`benchmarks/bench_nothing.py`": "benchmark benchmarks/bench_nothing.py does not exist",
        "`bench_sd.py --no-such-bench-flag`": "option --no-such-bench-flag is not an option of benchmarks/bench_sd.py",
        "[a page](no_such_page.md)": "link no_such_page.md points to no file",
    }
    for line, expected in planted.items():
        found = checker.problems(line + "\n")
        assert any(expected in p for p in found), f"{line!r} gave {found}"
    block = "```yaml\ncapture: {steps: 15}\nprobe:\n  no_such_key: 1\nno_such_section: {a: 1}\n```\n"
    found = checker.problems(block)
    assert any("probe.no_such_key" in p for p in found) and any("section no_such_section" in p for p in found), found
    found = checker.problems("```bash\nsceneprobe run --sd /m \\\n    --no-such-flag x\n```\n")
    assert any("--no-such-flag" in p for p in found), found
    found = checker.problems("a span that wraps, `sceneprobe run\n--no-such-wrapped RUN`, is read whole\n")
    assert any("--no-such-wrapped is not an option of `sceneprobe run`" in p for p in found), found


def test_the_checker_accepts_real_names(checker):
    good = ("`sceneprobe run --sd PATH --prompts CSV --out RUN`, `make run`, `make test`, `probe.layout`, "
            "`report.html`, `vae.dec.mid.attn0`, `capture: {store: streamed, checkpoint_every: 8}`, "
            "`src/sceneprobe/presets/cpu.yaml`, `pretrained/cpu/training.json`, `sceneprobe.cli.build_parser`, "
            "`benchmarks/bench_sd.py --size 32 --prompts 8`, `accelerate launch --multi_gpu -m sceneprobe run --sd x`, "
            "`runs/default/report/summary.md`, `--adopt`, `sceneprobe sites --model PATH`, `benchmarks/<name>.py`\n"
            "```yaml\ncapture: {store: streamed}\nprobe:\n  workers: 2\n```\n")
    assert checker.problems(good) == []


# ------------------------------------------------------------------------------------- docs/configuration.md's tables
def _cell(v) -> str:
    """A value as configuration.md writes it: ``[16, 32, 64]``, ``true``, ``1e-07``, ``""``."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_cell(x) for x in v) + "]"
    if isinstance(v, float):
        return "1/3" if v == 1 / 3 else f"{v:g}"
    return '""' if v == "" else str(v)


def config_table_rows(text: str) -> dict[str, tuple[str, str]]:
    """{section.key: (default cell, presets cell)} of the tables in configuration.md."""
    return {m.group(1): (m.group(2).strip(), m.group(3).strip())
            for m in re.finditer(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|([^|]*)\|([^|]*)\|", text, re.M)}


def config_table_problems(text: str) -> list[str]:
    """Every key of the config dataclasses has a row, with the code's default and the presets' values."""
    from importlib import resources
    presets = {p: yaml.safe_load(resources.files("sceneprobe.presets").joinpath(f"{p}.yaml").read_text()) or {}
               for p in ("cpu", "gpu", "tiny")}
    rows, root, out = config_table_rows(text), Config(), []
    for f in dataclasses.fields(Config):
        sec = getattr(root, f.name)
        if not dataclasses.is_dataclass(sec) or f.name == "labeller_readout":   # its own paragraph, as inline YAML
            continue
        for g in dataclasses.fields(sec):
            key = f"{f.name}.{g.name}"
            if key not in rows:
                out.append(f"config key {key} has no row in docs/configuration.md; add one (default, presets, meaning)")
                continue
            default, in_presets = rows[key]
            if default != _cell(getattr(sec, g.name)):
                out.append(f"docs/configuration.md: {key} default is {_cell(getattr(sec, g.name))}, the row says "
                           f"{default}")
            vals = [_cell(presets[p][f.name][g.name]) if g.name in (presets[p].get(f.name) or {}) else "·"
                    for p in ("cpu", "gpu", "tiny")]
            want = " / ".join(vals) if any(v != "·" for v in vals) else ""
            if in_presets != want:
                out.append(f"docs/configuration.md: {key} presets (cpu / gpu / tiny) are {want or 'none'}, the row "
                           f"says {in_presets or 'none'}")
    return out


def test_configuration_page_lists_every_key_with_its_default_and_presets():
    problems = config_table_problems((ROOT / "docs" / "configuration.md").read_text())
    assert not problems, "\n".join(problems)


def test_the_configuration_check_finds_planted_mistakes():
    text = (ROOT / "docs" / "configuration.md").read_text()
    wrong_default = text.replace("| `report.n_boot` | 2000 |", "| `report.n_boot` | 1000 |")
    assert any("report.n_boot default is 2000" in p for p in config_table_problems(wrong_default))
    missing = "\n".join(ln for ln in text.splitlines() if not ln.startswith("| `probe.workers`"))
    assert any("probe.workers has no row" in p for p in config_table_problems(missing))
    wrong_preset = text.replace("| `train_ldm.steps` | 6000 | 10500 / 50000 / 6 |",
                                "| `train_ldm.steps` | 6000 | 9000 / 50000 / 6 |")
    assert any("train_ldm.steps presets" in p for p in config_table_problems(wrong_preset))
