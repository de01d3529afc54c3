"""Rebuild the task folders' data from the packages the text ships in.

    python examples/tasks/build_data.py [--src DIR]

Downloads (into --src, default ``~/.cache/edgetune/task-sources``) and reads:

- Django 5.2.19 (PyPI wheel, BSD-3-Clause): the German ``.po`` catalogues -> ``translation``
- python3.11-doc 3.11.2-6+deb12u9 (Debian bookworm, PSF License): the FAQ -> ``qa``, the library
  reference's reST roles -> ``ner``, the tutorial -> ``domain``
- debian-faq 11.1 (Debian bookworm, GPL-2+): questions and answers -> ``chat``
- fortunes 1:1.99.1-7.3 (Debian bookworm, BSD-4-Clause-UC): ``songs-poems`` -> ``creative``
- the bookworm ``main`` amd64 package index: short descriptions and their section -> ``classification``

Nothing is generated: every question, answer, sentence, string and label was written by the
people behind those packages. The splits are fixed by a hash of each record's text, so a rebuild
gives the same files.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEBS = {"python3.11-doc": "3.11.2-6+deb12u9", "debian-faq": "11.1", "fortunes": "1:1.99.1-7.3"}
DJANGO = "5.2.19"
SRC = Path()


def split_of(text: str, valid: float, test: float) -> str:
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test else "valid" if h < test + valid else "train"


LICENCES = {  # the licence file of the package each folder's text comes from, copied beside the data
    "translation": "django/django-{DJANGO}.dist-info/licenses/LICENSE",
    "qa": "python3.11-doc/usr/share/doc/python3.11-doc/copyright",
    "ner": "python3.11-doc/usr/share/doc/python3.11-doc/copyright",
    "domain": "python3.11-doc/usr/share/doc/python3.11-doc/copyright",
    "chat": "debian-faq/usr/share/doc/debian-faq/copyright",
    "creative": "fortunes/usr/share/doc/fortunes/copyright",
}


def write(task: str, records: list[dict], valid: float, test: float, key, caps: dict[str, int], meta: dict) -> None:
    out = HERE / task
    out.mkdir(exist_ok=True)
    if task in LICENCES:
        (out / "SOURCE-LICENSE").write_bytes((SRC / LICENCES[task].format(DJANGO=DJANGO)).read_bytes())
    parts: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for r in records:
        parts[split_of(key(r), valid, test)].append(r)
    for name, recs in parts.items():
        recs = sorted(recs, key=lambda r: hashlib.sha256(("order" + key(r)).encode()).hexdigest())
        recs = recs[: caps.get(name, len(recs))]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        print(f"{task}/{name}.jsonl: {len(recs)} records")
    if meta:
        (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")


# -- sources ---------------------------------------------------------------------------------------
def fetch(src: Path) -> None:
    src.mkdir(parents=True, exist_ok=True)
    for pkg, ver in DEBS.items():
        d = src / pkg
        if d.is_dir():
            continue
        subprocess.run(["apt-get", "download", f"{pkg}={ver}"], cwd=src, check=True)
        deb = next(src.glob(f"{pkg}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(d)], check=True)
    if not (src / "django").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"django=={DJANGO}", "-d", str(src)],
                       check=True)
        with zipfile.ZipFile(next(src.glob(f"[Dd]jango-{DJANGO}-*.whl"))) as z:
            z.extractall(src / "django")
    if not (src / "Packages").is_file():
        lists = glob.glob("/var/lib/apt/lists/*debian_dists_bookworm_main_binary-amd64_Packages*")
        if not lists:
            raise SystemExit("no bookworm main package index: run apt-get update first")
        data = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", lists[0]], check=True,
                              capture_output=True).stdout
        (src / "Packages").write_bytes(data)


# -- reST to plain text ----------------------------------------------------------------------------
ROLE = re.compile(r":(?:\w+:)?(\w+):`(~?)([^`]+)`")


def role_text(kind: str, tilde: str, body: str) -> str:
    m = re.match(r"(.*?)\s*<[^>]+>$", body, re.S)
    if m and m.group(1):
        return m.group(1)
    body = body.lstrip("!")
    if tilde:
        body = body.split(".")[-1]
    if kind == "pep":
        return f"PEP {body}"
    return body


def plain(text: str, keep=None) -> tuple[str, list[dict]]:
    """reST inline markup to the text a reader sees; roles whose kind is in ``keep`` become entities."""
    ents: list[dict] = []
    out, pos = [], 0
    for m in ROLE.finditer(text):
        out.append(text[pos:m.start()])
        shown = role_text(*m.groups())
        if keep and m.group(1) in keep:
            ents.append({"text": shown, "type": keep[m.group(1)]})
        out.append(shown)
        pos = m.end()
    out.append(text[pos:])
    s = "".join(out)
    s = re.sub(r"`([^`<]+?)\s*<[^>]+>`__?", r"\1", s)
    s = re.sub(r"``([^`]+)``", r"\1", s)
    s = re.sub(r"`([^`]+)`_?", r"\1", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"\1", s)
    s = re.sub(r"\*([^*]+)\*", r"\1", s)
    s = re.sub(r"\s+", " ", s).strip()
    return s.replace(" ::", ":").replace("::", ":"), ents


def paragraphs(rst: str) -> list[str]:
    """The prose paragraphs of a reST file: no directives, code blocks, tables or headings."""
    out, cur, in_block = [], [], False
    lines = rst.splitlines()
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not line.strip():
            if cur:
                out.append(" ".join(cur))
                cur = []
            continue
        if line[0].isspace():
            if not cur:
                in_block = True  # indented: code, directive body, quote
                continue
        else:
            in_block = False
        if in_block:
            continue
        if line.startswith("..") or re.match(r"^[=\-~^\"'`#*+]{3,}\s*$", line) or \
                (nxt and re.match(r"^[=\-~^\"'`#*+]{3,}\s*$", nxt)) or line.lstrip().startswith(("|", "+-", "* ", "- ", ">>>")) \
                or re.match(r"^\s*\d+\.\s", line):
            if cur:
                out.append(" ".join(cur))
                cur = []
            in_block = line.startswith("..")
            continue
        cur.append(line.strip())
        if line.rstrip().endswith("::"):
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return out


SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def first_sentence(text: str) -> str:
    return SENT.split(text, 1)[0]


# -- tasks -----------------------------------------------------------------------------------------
def po_entries(path: Path):
    entry: dict[str, str] = {}
    flags, field = "", None

    def done():
        if entry.get("msgid") and entry.get("msgstr") and "msgid_plural" not in entry and "fuzzy" not in flags:
            yield entry["msgid"], entry["msgstr"]

    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip():
            yield from done()
            entry, flags, field = {}, "", None
        elif line.startswith("#,"):
            flags += line
        elif line.startswith("#"):
            continue
        elif line.startswith('"') and field:
            entry[field] += json.loads(line)
        else:
            key, _, val = line.partition(" ")
            field = key
            entry[field] = json.loads(val) if val.startswith('"') else ""


def translation(src: Path) -> None:
    seen, recs = set(), []
    system = "Translate the English user-interface string into German. Keep placeholders such as %(name)s unchanged."
    for po in sorted((src / "django").glob("django/**/locale/de/LC_MESSAGES/*.po")):
        for en, de in po_entries(po):
            if en in seen or "\n" in en or not 3 <= len(en) <= 120 or en == de:
                continue
            seen.add(en)
            en, de = en.strip(), de.strip()
            recs.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": en},
                                      {"role": "assistant", "content": de}]})
    write("translation", recs, 0.06, 0.08, lambda r: r["messages"][1]["content"], {"train": 600, "valid": 40, "test": 60},
          {"task": "translation"})


QA_SYSTEM = "Answer the question in one sentence, from the passage that answers it."


def qa(src: Path) -> None:
    """Python FAQ questions, each with three passages (the first paragraph of its own answer and of
    two other questions' answers from the same split, in an order fixed by a hash); the answer
    is the first sentence of its own passage. The passages are real; their grouping, as a
    retriever would hand them over, is ours."""
    items = []
    for f in sorted((src / "python3.11-doc").glob("usr/share/doc/python3.11/html/_sources/faq/*.rst.txt")):
        lines = f.read_text(encoding="utf-8").splitlines()
        heads = [i for i in range(len(lines) - 1) if lines[i].strip().endswith("?")
                 and re.match(r"^-{3,}\s*$", lines[i + 1]) and len(lines[i + 1].strip()) >= len(lines[i].strip()) - 1]
        for k, i in enumerate(heads):
            end = heads[k + 1] if k + 1 < len(heads) else len(lines)
            paras = [plain(p)[0] for p in paragraphs("\n".join(lines[i + 2:end]))]
            paras = [p for p in paras if len(p.split()) >= 5 and not p.endswith(":")]
            if not paras or len(paras[0].split()) > 90:
                continue
            answer = first_sentence(paras[0]).rstrip(":")
            if 4 <= len(answer.split()) <= 40:
                items.append({"question": plain(lines[i].strip())[0], "passage": paras[0], "answer": answer})
    h = lambda x: hashlib.sha256(x.encode()).hexdigest()  # noqa: E731
    recs = []
    for split in ("train", "valid", "test"):
        group = [it for it in items if split_of(it["question"], 0.1, 0.2) == split]
        for it in group:
            others = sorted((o for o in group if o is not it), key=lambda o: h(it["question"] + "|" + o["question"]))[:2]
            passages = [o["passage"] for o in others]
            passages.insert(int(h(it["question"]), 16) % 3, it["passage"])
            recs.append({"system": QA_SYSTEM, "context": "\n\n".join(passages), "question": it["question"],
                         "answer": it["answer"]})
    write("qa", recs, 0.1, 0.2, lambda r: r["question"], {"valid": 20, "test": 40}, {"task": "qa"})


NER_SYSTEM = ('List the Python modules, classes, functions and exceptions the sentence names, as a JSON list of '
              '{"text": ..., "type": ...} with type one of module, class, function, exception; [] if none.')
NER_TYPES = {"func": "function", "meth": "function", "class": "class", "mod": "module", "exc": "exception"}


def ner(src: Path) -> None:
    recs, seen = [], set()
    lib = src / "python3.11-doc" / "usr/share/doc/python3.11/html/_sources/library"
    for f in sorted(lib.glob("*.rst.txt")):
        for para in paragraphs(f.read_text(encoding="utf-8")):
            for sent in SENT.split(para):
                text, ents = plain(sent, NER_TYPES)
                if not 40 <= len(text) <= 220 or text in seen or text.endswith(":") or "|" in text:
                    continue
                uniq = list({(e["text"], e["type"]): e for e in ents}.values())
                if not uniq and int(hashlib.sha256(("none" + text).encode()).hexdigest()[:2], 16) > 12:
                    continue  # keep about one sentence in twenty without an entity
                seen.add(text)
                recs.append({"system": NER_SYSTEM, "text": text, "entities": uniq})
    write("ner", recs, 0.02, 0.03, lambda r: r["text"], {"train": 800, "valid": 40, "test": 60},
          {"task": "ner"})


def domain(src: Path) -> None:
    recs = []
    tut = src / "python3.11-doc" / "usr/share/doc/python3.11/html/_sources/tutorial"
    for f in sorted(tut.glob("*.rst.txt")):
        for p in paragraphs(f.read_text(encoding="utf-8")):
            text = plain(p)[0]
            if len(text.split()) >= 25:
                recs.append({"text": text})
    write("domain", recs, 0.08, 0.12, lambda r: r["text"], {}, {})


def chat(src: Path) -> None:
    txt = gzip.open(next((src / "debian-faq").glob("usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")), "rt").read()
    body = txt.split("\nChapter 1.", 1)[-1]
    system = "You answer questions about Debian GNU/Linux."
    recs = []
    for m in re.finditer(r"^\d+\.\d+\.\s+((?:[^\n]+\n)*?[^\n]+)\n\n(.*?)(?=^\d+\.\d+\.|\Z|^Chapter )", body,
                         re.M | re.S):
        q = " ".join(m.group(1).split())
        if "?" not in q:
            continue
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", m.group(2)) if p.strip()]
        paras = [p for p in paras if not p.startswith(("*", "$", "#"))]
        if not paras:
            continue
        ans, words = [], 0
        for p in paras:
            if words + len(p.split()) > 120 and ans:
                break
            ans.append(p)
            words += len(p.split())
        recs.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": q},
                                  {"role": "assistant", "content": "\n\n".join(ans)}]})
    write("chat", recs, 0.1, 0.2, lambda r: r["messages"][1]["content"], {}, {"task": "chat"})


def creative(src: Path) -> None:
    raw = (src / "fortunes" / "usr/share/games/fortunes/songs-poems").read_text(encoding="latin-1")
    recs = []
    for item in raw.split("\n%\n"):
        lines = [ln.rstrip() for ln in item.strip("\n").splitlines()]
        lines = [ln for ln in lines if not ln.strip().startswith("--")]
        while lines and not lines[-1].strip():
            lines.pop()
        if not 4 <= len(lines) <= 14 or any(len(ln) > 80 or not ln.strip() for ln in lines):
            continue
        recs.append({"prompt": "Continue this poem:\n" + lines[0].strip(), "completion": "\n".join(
            ln.strip() for ln in lines[1:])})
    write("creative", recs, 0.05, 0.1, lambda r: r["prompt"] + r["completion"], {"train": 400, "test": 40},
          {"task": "creative"})


SECTIONS = ("games", "sound", "graphics", "science", "mail", "editors")


def classification(src: Path) -> None:
    system = ("Which section of the Debian archive does this package belong to? Answer with one of: "
              + ", ".join(SECTIONS) + ".")
    recs, seen, per = [], set(), {s: 0 for s in SECTIONS}
    stanzas = (src / "Packages").read_text(encoding="utf-8").split("\n\n")
    for stanza in sorted(stanzas, key=lambda s: hashlib.sha256(s.encode()).hexdigest()):
        fields = dict(re.findall(r"^([\w-]+): (.*)$", stanza, re.M))
        sec, desc = fields.get("Section", ""), fields.get("Description", "")
        if sec not in SECTIONS or fields.get("Package", "").endswith(("-data", "-dbg", "-doc", "-common", "-dev")):
            continue
        if desc.lower() in seen or len(desc) < 15 or per[sec] >= 170:
            continue
        seen.add(desc.lower())
        per[sec] += 1
        recs.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": desc},
                                  {"role": "assistant", "content": sec}]})
    write("classification", recs, 0.1, 0.15, lambda r: r["messages"][1]["content"], {},
          {"task": "classification"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path.home() / ".cache/edgetune/task-sources")
    ap.add_argument("tasks", nargs="*", default=["translation", "qa", "ner", "domain", "chat", "creative",
                                                 "classification"])
    a = ap.parse_args()
    global SRC
    SRC = a.src
    fetch(a.src)
    for t in a.tasks:
        globals()[t](a.src)


if __name__ == "__main__":
    main()
