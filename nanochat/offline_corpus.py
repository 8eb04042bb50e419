"""
The offline pretraining corpus: real English text that Debian packages ship (dictionaries,
WordNet, man pages, the kernel and Python documentation, the King James Bible, fortunes, the
Debian Reference), cleaned, cut into documents of 500-8,000 characters, deduplicated and
shuffled into the shards dataset.py reads (10 by default, the last one for validation), with
LICENSES.md and offline_manifest.json next to them. The same package versions give
byte-identical shards. Run once by `./setup.sh --offline-data`, for machines without the
Hugging Face Hub.

Not for: the training path (dataset.py lists and reads the shards, dataloader.py batches
them); downloading FineWeb-EDU (dataset.py).

Usage:
    python -m nanochat.offline_corpus                  # build into $NANOCHAT_BASE_DIR/base_data
    python -m nanochat.offline_corpus --allow-partial  # from the packages that are installed
"""

import glob
import gzip
import hashlib
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import ArgumentParser, atomic_write, print0
from nanochat.dataset import (OFFLINE_MANIFEST, ROW_GROUP_SIZE, DatasetError, get_data_dir, list_parquet_files,
                              shard_name)

OFFLINE_SEED = 1337       # the document shuffle; fixed so the same packages give the same shards
OFFLINE_NUM_SHARDS = 10   # the last one is the validation shard
MAX_DOC_CHARS = 8000      # longer texts are cut at paragraph boundaries into pieces of at most this
GROUP_DOC_CHARS = 4000    # dictionary entries, glosses and fortunes are grouped into documents of ~this (~1k tokens)
MIN_DOC_CHARS = 500       # shorter documents (index pages, stubs) are dropped
# Documents whose visible (non-whitespace) bytes are less than 40% ASCII letters are dropped: on this corpus that
# is ~80 documents of ASCII art and box-drawn tables, while the man pages of math functions and C examples
# (45-60%) stay; prose is above 80%.
MIN_LETTER_FRACTION = 0.4
LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
WHITESPACE = b" \t\n"
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def normalize_text(text):
    """Unix newlines, no control characters but tab and newline, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL_CHARS.sub("", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def decode_bytes(data):
    """UTF-8, or Latin-1 for the few old files that are not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_text_file(path):
    """The text of a plain or gzip-compressed file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return decode_bytes(f.read())


def split_to_fit(text, max_chars):
    """Cut `text` at line boundaries (mid-line only for longer lines) into pieces of at most max_chars characters."""
    lines = []
    for line in text.split("\n"):
        while len(line) > max_chars:
            lines.append(line[:max_chars])
            line = line[max_chars:]
        lines.append(line)
    return pack_units(lines, max_chars, target_chars=max_chars, sep="\n")


def pack_units(units, max_chars=MAX_DOC_CHARS, target_chars=None, sep="\n\n"):
    """Join consecutive text units (paragraphs, entries) into documents of at most max_chars characters.

    A document is closed once it reaches target_chars. Without target_chars the text is cut into
    the fewest documents that fit, of about equal length (a 9,000-character page becomes two of
    ~4,500, not 8,000 + 1,000). Units longer than max_chars are cut at line boundaries first.
    """
    pieces = []
    for unit in units:
        pieces.extend([unit] if len(unit) <= max_chars else split_to_fit(unit, max_chars))
    pieces = [p for p in pieces if p.strip()]
    if not pieces:
        return []
    if target_chars is None:
        total = sum(len(p) for p in pieces) + len(sep) * (len(pieces) - 1)
        target_chars = total / math.ceil(total / max_chars)
    docs, current, length = [], [], 0
    for piece in pieces:
        added = len(piece) + (len(sep) if current else 0)
        if current and length + added > max_chars:
            docs.append(sep.join(current))
            current, length, added = [], 0, len(piece)
        current.append(piece)
        length += added
        if length >= target_chars:
            docs.append(sep.join(current))
            current, length = [], 0
    if current:
        docs.append(sep.join(current))
    return docs


def split_paragraphs(text):
    """Paragraphs of a normalized text (separated by blank lines)."""
    return text.split("\n\n")


def keep_document(doc):
    """True for a document of at least MIN_DOC_CHARS characters, mostly letters (drops stubs, tables, ASCII art)."""
    if len(doc) < MIN_DOC_CHARS:
        return False
    data = doc.encode("utf-8")
    letters = len(data) - len(data.translate(None, LETTERS))
    return letters >= MIN_LETTER_FRACTION * len(data.translate(None, WHITESPACE))


def read_dpkg_status(root):
    """Map each installed package to its version, from <root>/var/lib/dpkg/status; None if that file is absent."""
    path = os.path.join(root, "var/lib/dpkg/status")
    if not os.path.exists(path):
        return None
    installed = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for stanza in f.read().split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", stanza, flags=re.M))
            if fields.get("Status", "").endswith(" installed") and "Package" in fields:
                installed[fields["Package"]] = fields.get("Version", "")
    return installed


def package_files(root, package):
    """The files `package` installed (paths under `root`), from dpkg's <root>/var/lib/dpkg/info/<package>.list."""
    info = os.path.join(root, "var/lib/dpkg/info")
    lists = glob.glob(os.path.join(info, package + ".list"))
    lists += sorted(glob.glob(os.path.join(info, package + ":*.list")))  # multi-arch packages: <package>:<arch>.list
    if not lists:
        return []
    with open(lists[0], encoding="utf-8", errors="replace") as f:
        return [os.path.join(root, line.strip().lstrip("/")) for line in f if line.strip()]


def regular_files(paths):
    """The paths that are regular files and not symbolic links (links duplicate what they point to)."""
    return [p for p in paths if os.path.isfile(p) and not os.path.islink(p)]


# Sources. Each has a function that lists its work items (files, or parts of one big file) and a
# function that turns one item into documents; the items are spread over a process pool.

def decode_dictd_number(text):
    """A dictd index offset or length: a base-64 number, digits A-Z a-z 0-9 + / (see dictfmt(1))."""
    value = 0
    for char in text:
        value = value * 64 + DICTD_DIGITS[char]
    return value


DICTD_DIGITS = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
DICTD_INDEX_LINE = re.compile(r"^([^\t\n]*)\t([A-Za-z0-9+/]+)\t([A-Za-z0-9+/]+)", re.M)
ENTRY_SEPARATOR = "\ue000"  # a private-use character: a part's entries are cleaned as one string, then split apart
# GCIDE source tags: "[1913 Webster]", "[WordNet 1.5 +PJC]", ... Most stand on a line of their own; some end a
# line or start one, and ~4,000 are followed by a stray copy of the next headword ("[1913 Webster] Abatis").
GCIDE_TAG = r"\[[^\]\n]*\b(?:Webster|WordNet|PJC|Century|RDH|AS)\b[^\]\n]*\]"
GCIDE_TAG_LINE = re.compile(rf"^[ \t]*{GCIDE_TAG}(?:[ \t]+\S+)?[ \t]*\n", re.M)
GCIDE_TAG_INLINE = re.compile(rf"{GCIDE_TAG}(?:[ \t]+\S+[ \t]*$|[ \t]*)", re.M)
GCIDE_PRONUNCIATION = re.compile(r" ?\\[^\\\n]*\\")
CONTINUATION_INDENT = re.compile(r"\n( *)\S")


def clean_dictd_entries(entries, dictionary):
    """Dictd entries as plain text: no {cross-reference} braces, no common indentation of the lines after the
    headword; for GCIDE also no source tags such as "[1913 Webster]" and no pronunciation keys such as
    \\Di*chot"o*my\\."""
    assert not any(ENTRY_SEPARATOR in entry for entry in entries)
    text = ENTRY_SEPARATOR.join(entries)
    if dictionary == "gcide":
        text = GCIDE_TAG_INLINE.sub("", GCIDE_TAG_LINE.sub("", text))
        text = GCIDE_PRONUNCIATION.sub("", text)
    text = normalize_text(text.replace("{", "").replace("}", ""))
    cleaned = []
    for entry in text.split(ENTRY_SEPARATOR):
        entry = entry.strip()
        indent = min(map(len, CONTINUATION_INDENT.findall(entry)), default=0)
        cleaned.append(entry.replace("\n" + " " * indent, "\n") if indent else entry)
    return cleaned


def list_dictd_items(root, dictionary, parts):
    """Work items of a dictd dictionary: (name, part, parts), so a big dictionary is read by several processes."""
    return [(dictionary, part, parts) for part in range(parts)]


def read_dictd(root, item):
    """Part `part` of `parts` of a dictd dictionary (.index + gzip-readable .dict.dz), entries grouped in documents."""
    dictionary, part, parts = item
    base = os.path.join(root, "usr/share/dictd", dictionary)
    with open(base + ".index", encoding="utf-8", errors="replace") as f:
        spans = {(offset, length) for headword, offset, length in DICTD_INDEX_LINE.findall(f.read())
                 if not headword.startswith(("00-database", "00database"))}  # skip the dictionary's own metadata
    # in file order; the set already merged the headwords that share an entry
    spans = sorted((decode_dictd_number(o), decode_dictd_number(n)) for o, n in spans)
    spans = spans[len(spans) * part // parts: len(spans) * (part + 1) // parts]
    with gzip.open(base + ".dict.dz", "rb") as f:
        data = f.read()
    entries = clean_dictd_entries([decode_bytes(data[offset:offset + length]) for offset, length in spans], dictionary)
    return pack_units(entries, target_chars=GROUP_DOC_CHARS)


WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def list_wordnet_items(root):
    """Work items of WordNet: its four data files, one per part of speech."""
    return [os.path.join(root, "usr/share/wordnet", "data." + pos) for pos in WORDNET_POS]


def read_wordnet(root, path):
    """WordNet synsets of one part of speech as "word, synonym (noun): gloss" lines (format: wndb(5WN))."""
    pos = WORDNET_POS[path.rsplit(".", 1)[1]]
    entries = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:  # the license header lines start with two spaces
                continue
            fields, gloss = line.split(" | ", 1)
            fields = fields.split(" ")
            words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * int(fields[3], 16):2]]
            entries.append(f"{', '.join(words)} ({pos}): {gloss.strip()}")
    return pack_units(entries, target_chars=GROUP_DOC_CHARS, sep="\n")


def list_linux_doc_items(root):
    """Work items of the kernel documentation: its .rst.gz and .txt.gz files (not YAML bindings, not translations)."""
    pattern = os.path.join(root, "usr/share/doc/linux-doc-*/Documentation/**/*")
    paths = [p for p in glob.glob(pattern, recursive=True) if p.endswith((".rst.gz", ".txt.gz"))]
    return sorted(p for p in regular_files(paths) if "/translations/" not in p)


def list_python_doc_items(root):
    """Work items of the Python documentation: the reStructuredText sources that its HTML was built from."""
    pattern = os.path.join(root, "usr/share/doc/python3.*/html/_sources/**/*.rst.txt")
    # realpath: python3.X-doc/html is a link to python3.X/html, so the glob finds every file twice
    return sorted({os.path.realpath(p) for p in glob.glob(pattern, recursive=True)})


def list_debian_reference_items(root):
    """Work items of the Debian Reference: the plain-text rendering the package ships next to its HTML."""
    return [os.path.join(root, "usr/share/debian-reference/debian-reference.en.txt.gz")]


def read_plain_document(root, path):
    """A reStructuredText or plain-text file, cut into documents at paragraph boundaries."""
    return pack_units(split_paragraphs(normalize_text(read_text_file(path))))


MAN_BATCH = 32  # pages per groff run: a run costs ~25 ms of CPU to start, a page ~2 ms to render (measured here)


def list_man_items(root):
    """Work items of the man pages of manpages and manpages-dev: tuples of up to MAN_BATCH page paths."""
    paths = package_files(root, "manpages") + package_files(root, "manpages-dev")
    paths = sorted(p for p in regular_files(paths) if re.search(r"/usr/share/man/man\d/[^/]+\.gz$", p))
    return [tuple(paths[i:i + MAN_BATCH]) for i in range(0, len(paths), MAN_BATCH)]


# -t: tables (tbl), -k -Kutf-8: UTF-8 input (preconv), -man: the Linux man-pages are all man(7) (with -mandoc
# the macros load at the first .TH, after the prelude), -P-c -P-b -P-u: plain text, no escape sequences, bold
# or underline. The prelude sets ragged-right text without hyphenation and then turns the requests .ad and .hy
# into no-ops, so neither the macros nor a page (many switch adjusting back on after their SYNOPSIS) undo it.
GROFF_ARGS = ["-t", "-k", "-Kutf-8", "-man", "-Tutf8", "-P-c", "-P-b", "-P-u"]
MAN_PRELUDE = b".ad l\n.nh\n.de ad\n..\n.de hy\n..\n"
MAN_PAGE_END = "NANOCHAT-MAN-PAGE-END"
OVERSTRIKE = re.compile(r".\x08")


def run_groff(root, source):
    """Render man(7) source (bytes) to text (str) with <root>/usr/bin/groff (package groff-base).

    Raises:
        DatasetError: groff exits with an error and prints nothing; the message says to reinstall it.
    """
    result = subprocess.run([os.path.join(root, "usr/bin/groff")] + GROFF_ARGS, input=MAN_PRELUDE + source,
                            capture_output=True, env={**os.environ, "GROFF_NO_SGR": "1"})
    if result.returncode != 0 and not result.stdout:
        raise DatasetError(f"groff failed: {decode_bytes(result.stderr).strip()[:500]}. "
                           f"Reinstall it: {install_command(['--reinstall', 'groff-base'])}")
    text = OVERSTRIKE.sub("", decode_bytes(result.stdout))
    return text.replace("\u2010", "-").replace("\u2212", "-")  # groff renders "-" as U+2010 and "\-" as U+2212


def render_man_pages(root, sources):
    """Render man pages (list of bytes) to text, without their header and footer lines; one groff run for all.

    The pages are separated by a line MAN_PAGE_END in the output. If a page swallows that line
    (it ends inside a macro definition, say), every page is rendered on its own instead.
    """
    separator = f"\n.nf\n.in 0\n{MAN_PAGE_END}\n.fi\n".encode()
    text = run_groff(root, b"".join(source + separator for source in sources))
    pieces = re.split(rf"^[ \t]*{MAN_PAGE_END}[ \t]*$", text, flags=re.M)
    if len(pieces) == len(sources) + 1:  # the last piece holds the footer of the last page
        return [normalize_text(piece).partition("\n")[2] for piece in pieces[:-1]]
    pages = []
    for source in sources:
        lines = normalize_text(run_groff(root, source)).split("\n")
        pages.append("\n".join(lines[1:-1]))  # "open(2)  System Calls Manual  open(2)" ... "Linux man-pages 6.03 ..."
    return pages


def read_man_pages(root, paths):
    """Man pages rendered with groff, each cut into documents at paragraph boundaries.

    Raises:
        DatasetError: groff fails (see run_groff).
    """
    sources = []
    for path in paths:
        with gzip.open(path, "rb") as f:
            source = f.read()
        if not source.startswith(b".so "):  # a one-line alias of another page
            sources.append(source.rstrip(b"\n") + b"\n")
    docs = []
    for page in render_man_pages(root, sources) if sources else []:
        docs.extend(pack_units(split_paragraphs(normalize_text(page))))
    return docs


CHAPTER_HEADING = re.compile(r"^(\S.*\S) (\d+)$")


def list_bible_items(root):
    """Work items of the Bible: one verse range, Genesis 1:1 to Revelation 22:21 (one run of `bible` takes ~0.1 s)."""
    return ["Ge1:1-Re22:21"]


def read_bible(root, verses):
    """The King James Bible read out by the `bible` program (bible-kjv), one document per chapter.

    Raises:
        DatasetError: `bible` fails; the message says to reinstall it.
    """
    result = subprocess.run([os.path.join(root, "usr/bin/bible"), "-p", os.path.join(root, "usr/lib"), "-l0", verses],
                            capture_output=True)
    if result.returncode != 0:
        raise DatasetError(f"`bible -l0 {verses}` failed: {decode_bytes(result.stderr).strip()}. "
                           f"Reinstall it: {install_command(['--reinstall', 'bible-kjv', 'bible-kjv-text'])}")
    chapters = []
    for line in normalize_text(decode_bytes(result.stdout)).split("\n"):
        if CHAPTER_HEADING.match(line):
            chapters.append([line, ""])
        elif chapters and line.strip():
            chapters[-1].append(line.strip())
    docs = []
    for chapter in chapters:
        docs.extend(pack_units(["\n".join(chapter)]))
    return docs


def list_fortune_items(root):
    """Work items of fortunes and fortunes-min: their fortune files (not the .dat indexes or .u8 links)."""
    paths = package_files(root, "fortunes") + package_files(root, "fortunes-min")
    return sorted(p for p in regular_files(paths)
                  if "/usr/share/games/fortunes/" in p and not p.endswith((".dat", ".u8")))


def read_fortunes(root, path):
    """A fortune cookie file (fortunes separated by lines holding "%"), fortunes grouped into documents."""
    text = normalize_text(read_text_file(path))
    fortunes = [f.strip("\n") for f in re.split(r"^%$", text, flags=re.M) if f.strip()]
    return pack_units(fortunes, target_chars=GROUP_DOC_CHARS)


@dataclass(frozen=True)
class Source:
    """One part of the corpus: the packages it needs, and how to list and read its work items."""
    name: str
    packages: tuple    # Debian packages it needs (the text, and the program that reads it out)
    copyrights: tuple  # globs, relative to the root, of the copyright files recorded in LICENSES.md
    list_items: Callable  # root -> work items
    read: Callable        # (root, item) -> documents


def copyright_of(package):
    """The glob of a package's copyright file, relative to the root."""
    return f"usr/share/doc/{package}/copyright"


CORPUS_SOURCES = [  # the slow ones first, so that the process pool ends evenly
    Source("gcide", ("dict-gcide",), (copyright_of("dict-gcide"),),
           partial(list_dictd_items, dictionary="gcide", parts=2), read_dictd),
    Source("man-pages", ("manpages", "manpages-dev", "groff-base"),
           (copyright_of("manpages"), copyright_of("manpages-dev")), list_man_items, read_man_pages),
    Source("linux-doc", ("linux-doc",), (copyright_of("linux-doc-*"),), list_linux_doc_items, read_plain_document),
    Source("python-doc", ("python3-doc",), (copyright_of("python3.*-doc"),),
           list_python_doc_items, read_plain_document),
    Source("wordnet", ("wordnet-base",), (copyright_of("wordnet-base"),), list_wordnet_items, read_wordnet),
    Source("foldoc", ("dict-foldoc",), (copyright_of("dict-foldoc"),),
           partial(list_dictd_items, dictionary="foldoc", parts=1), read_dictd),
    Source("jargon", ("dict-jargon",), (copyright_of("dict-jargon"),),
           partial(list_dictd_items, dictionary="jargon", parts=1), read_dictd),
    Source("devils-dictionary", ("dict-devil",), (copyright_of("dict-devil"),),
           partial(list_dictd_items, dictionary="devil", parts=1), read_dictd),
    Source("bible-kjv", ("bible-kjv-text", "bible-kjv"), (copyright_of("bible-kjv-text"),),
           list_bible_items, read_bible),
    Source("fortunes", ("fortunes", "fortunes-min"), (copyright_of("fortunes"), copyright_of("fortunes-min")),
           list_fortune_items, read_fortunes),
    Source("debian-reference", ("debian-reference-en",), (copyright_of("debian-reference-en"),),
           list_debian_reference_items, read_plain_document),
]
OFFLINE_PACKAGES = sorted({p for source in CORPUS_SOURCES for p in source.packages})


def cpu_seconds():
    """CPU time (user + system) of this process and of the programs it ran (groff, bible), in seconds."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def read_source_item(task):
    """Worker: (source index, root, item) -> (documents kept, CPU seconds)."""
    source_index, root, item = task
    t0 = cpu_seconds()
    docs = [d for d in CORPUS_SOURCES[source_index].read(root, item) if keep_document(d)]
    return docs, cpu_seconds() - t0


def install_command(packages):
    """The apt-get command that installs `packages`, with sudo unless we are root."""
    prefix = "" if hasattr(os, "geteuid") and os.geteuid() == 0 else "sudo "
    return f"{prefix}apt-get install -y {' '.join(packages)}"


def select_sources(root, allow_partial):
    """The sources whose packages are installed under `root`, and {package: version} of those packages.

    Raises:
        DatasetError: no dpkg database under `root`, or packages are missing (unless allow_partial
            and at least one source is complete); the message holds the apt-get command.
    """
    installed = read_dpkg_status(root)
    if installed is None:
        raise DatasetError(
            f"no Debian package database at {os.path.join(root, 'var/lib/dpkg/status')}: the offline corpus is "
            f"built from Debian packages. On another system download FineWeb-EDU shards instead: "
            f"`python -m nanochat.dataset -n 8`")
    missing = [p for p in OFFLINE_PACKAGES if p not in installed]
    sources = [s for s in CORPUS_SOURCES if all(p in installed for p in s.packages)]
    if missing and (not allow_partial or not sources):
        message = (f"the offline corpus needs Debian packages that are not installed: {', '.join(missing)}. "
                   f"Install them with:\n    {install_command(missing)}\n(dev/offline_packages.txt lists all of them)")
        if not allow_partial:
            message += "\nor pass --allow-partial to build from the packages that are installed"
        raise DatasetError(message)
    versions = {p: installed[p] for s in sources for p in s.packages}
    return sources, versions


def license_summary(text):
    """The distinct `License:` names of a machine-readable (DEP-5) copyright file, else a pointer to the text."""
    names = sorted(set(re.findall(r"^License: *(\S.*)$", text, flags=re.M)))
    return ", ".join(names) if text.startswith("Format:") and names else "see the copyright text below"


def render_licenses(sources, root):
    """LICENSES.md: for each source, its packages and the verbatim /usr/share/doc/<package>/copyright files."""
    out = ["# Licenses of the offline corpus\n",
           "Each document comes from one of the Debian packages below; this records their copyright files.\n"]
    for source in sources:
        out.append(f"## {source.name} ({', '.join(source.packages)})\n")
        for pattern in source.copyrights:
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                text = read_text_file(path)
                rel = "/" + os.path.relpath(path, root)
                out.append(f"### {rel}\n\nLicenses: {license_summary(text)}\n\n```\n{text.strip()}\n```\n")
    return "\n".join(out)


def build_offline_corpus(data_dir=None, root="/", allow_partial=False, force=False, num_workers=None,
                         num_shards=OFFLINE_NUM_SHARDS):
    """Build the offline pretraining corpus from installed Debian packages; return the manifest (dict).

    Writes num_shards shards (the last is validation) plus offline_manifest.json (per-source
    documents and bytes, package versions) and LICENSES.md into data_dir. `root` is the
    filesystem the packages are installed in (tests point it at a fixture tree). Documents are
    500-8,000 characters, deduplicated, and shuffled with a fixed seed, so the same package
    versions give byte-identical shards. An existing build of the same package versions is kept
    unless `force`.

    Raises:
        DatasetError: packages are missing (see select_sources), or data_dir holds other shards.
    """
    data_dir = data_dir or get_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    t0 = time.time()
    sources, versions = select_sources(root, allow_partial)
    manifest_path = os.path.join(data_dir, OFFLINE_MANIFEST)
    existing = list_parquet_files(data_dir)
    if existing and not os.path.exists(manifest_path):
        raise DatasetError(
            f"{data_dir} already holds {len(existing)} shards that are not the offline corpus "
            f"(downloaded FineWeb-EDU?). "
            f"Move them away (mv {data_dir} {data_dir}.fineweb) or point NANOCHAT_BASE_DIR elsewhere")
    if os.path.exists(manifest_path) and not force:
        with open(manifest_path, encoding="utf-8") as f:
            old = json.load(f)
        same_shards = [os.path.basename(p) for p in existing] == [s["file"] for s in old["shards"]]
        if old.get("packages") == versions and same_shards:
            print0(f"offline corpus already built in {data_dir} from the same packages "
                   f"({old['total_documents']:,} documents); pass --force to rebuild")
            return old

    # read every source, its work items spread over the processes
    tasks, owners = [], []
    for source_index, source in enumerate(CORPUS_SOURCES):
        if source in sources:
            items = source.list_items(root)
            tasks.extend((source_index, root, item) for item in items)
            owners.extend([source.name] * len(items))
    num_workers = num_workers or os.cpu_count() or 1
    print0(f"building the offline corpus from {len(sources)} sources ({len(tasks):,} files or parts) "
           f"with {num_workers} processes into {data_dir}")
    docs_by_source = {source.name: [] for source in sources}
    seconds_by_source = {source.name: 0.0 for source in sources}
    remaining = {name: owners.count(name) for name in docs_by_source}
    with Pool(num_workers) as pool:
        for owner, (docs, seconds) in zip(owners, pool.imap(read_source_item, tasks, chunksize=4)):
            docs_by_source[owner].extend(docs)
            seconds_by_source[owner] += seconds
            remaining[owner] -= 1
            if remaining[owner] == 0:
                docs = docs_by_source[owner]
                print0(f"{owner:>18}: {len(docs):>6,} documents {sum(len(d.encode()) for d in docs) / 1e6:6.1f} MB "
                       f"{seconds_by_source[owner]:5.1f} s CPU")

    # deduplicate across sources (first occurrence wins), then shuffle
    seen, corpus, stats = set(), [], {}
    for source in sources:
        kept = []
        for text in docs_by_source[source.name]:
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key not in seen:
                seen.add(key)
                kept.append(text)
        stats[source.name] = {"packages": {p: versions[p] for p in source.packages}, "documents": len(kept),
                              "bytes": sum(len(t.encode("utf-8")) for t in kept),
                              "duplicates_dropped": len(docs_by_source[source.name]) - len(kept)}
        corpus.extend(kept)
    if len(corpus) < num_shards:
        raise DatasetError(f"only {len(corpus)} documents from the installed packages, fewer than {num_shards} shards")
    random.Random(OFFLINE_SEED).shuffle(corpus)

    # write the shards, then the licenses and the manifest (the manifest marks a finished build)
    for path in existing:
        os.remove(path)
    shards = []
    for i in range(num_shards):
        texts = corpus[len(corpus) * i // num_shards: len(corpus) * (i + 1) // num_shards]
        table = pa.table({"text": pa.array(texts, type=pa.string())})
        path = os.path.join(data_dir, shard_name(i))
        atomic_write(path, partial(pq.write_table, table, row_group_size=ROW_GROUP_SIZE, compression="zstd"))
        shards.append({"file": shard_name(i), "split": "val" if i == num_shards - 1 else "train",
                       "documents": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts)})
    atomic_write(os.path.join(data_dir, "LICENSES.md"), render_licenses(sources, root))
    manifest = {"description": "nanochat's offline pretraining corpus, built from Debian packages by "
                               "`python -m nanochat.offline_corpus`",
                "seed": OFFLINE_SEED, "packages": versions, "sources": stats, "shards": shards,
                "total_documents": len(corpus), "total_bytes": sum(s["bytes"] for s in shards)}
    atomic_write(manifest_path, json.dumps(manifest, indent=2) + "\n")
    print0(f"{'total':>18}: {len(corpus):>6,} documents {manifest['total_bytes'] / 1e6:6.1f} MB in {num_shards} shards "
           f"(last = validation), {time.time() - t0:.1f} s wall")
    return manifest


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    """`python -m nanochat.offline_corpus [flags]`; a user error exits with its message, not a traceback."""
    parser = ArgumentParser(
        prog="python -m nanochat.offline_corpus",
        description=f"Build the offline pretraining corpus ({OFFLINE_NUM_SHARDS} shards, the last one for "
                    "validation) from the text in Debian packages (list: dev/offline_packages.txt) into "
                    "$NANOCHAT_BASE_DIR/base_data.")
    parser.add_argument("-w", "--num-workers", type=int, default=None,
                        help="build processes (default: CPU count)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="build from the installed packages when some are missing")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    parser.add_argument("--root", default="/", help="the filesystem the packages are installed in")
    args = parser.parse_args(argv)
    if args.num_workers is not None and args.num_workers < 1:
        parser.error("-w/--num-workers must be at least 1")
    try:
        build_offline_corpus(root=args.root, allow_partial=args.allow_partial, force=args.force,
                             num_workers=args.num_workers)
    except (DatasetError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
