"""Tests for nanochat/offline_corpus.py: the offline corpus built from a fake Debian file tree (and,
marked slow, from the installed packages), its CLI, and its text helpers."""

import gzip
import hashlib
import json
import os
import random
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import offline_corpus
from nanochat.dataset import OFFLINE_MANIFEST, DatasetError, list_parquet_files, parquets_iter_batched
from nanochat.offline_corpus import build_offline_corpus, main, pack_units

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ("the a of to and in that is was for with as on by light water time people world system file "
         "process memory value number word house river garden morning letter question answer").split()


def prose(rng, chars):
    """Deterministic English-looking sentences, about `chars` characters."""
    out = []
    while sum(map(len, out)) < chars:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def paragraphs(rng, count, chars=400):
    return "\n\n".join(prose(rng, chars) for _ in range(count))


# -----------------------------------------------------------------------------
# A fake root: the files of every package the offline corpus reads, small, plus dpkg's database

def encode_dictd_number(value):
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[value % 64] + out
        value //= 64
        if value == 0:
            return out


def write(path, data, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def write_dictd(root, name, entries):
    """A dictd dictionary: .dict.dz (gzip) and .index (headword, base-64 offset, base-64 length)."""
    data, index = b"", []
    for headwords, text in [(["00-database-info"], "This file was converted by dictfmt (metadata).\n")] + entries:
        raw = text.encode()
        index += [f"{h}\t{encode_dictd_number(len(data))}\t{encode_dictd_number(len(raw))}" for h in headwords]
        data += raw
    write(f"{root}/usr/share/dictd/{name}.dict.dz", gzip.compress(data, mtime=0))
    write(f"{root}/usr/share/dictd/{name}.index", "\n".join(sorted(index)) + "\n")


FAKE_GROFF = """#!{python}
# Stand-in for groff: a header line at each .TH, the text lines, a footer at the end; drops other requests
# and macro definitions.
import sys
out, in_macro = [], False
for line in sys.stdin.read().splitlines():
    if in_macro or line.startswith(".de"):  # a macro definition runs to "..", swallowing what comes before it
        in_macro = line != ".."
    elif line.startswith(".TH"):
        out.append("FAKE-HEADER " + line[4:])
    elif line.startswith(".SH"):
        out.append("".join(c + "\\b" + c for c in line[4:]))  # bold by overstriking, as old grotty does
    elif not line.startswith("."):
        out.append("       " + line.replace("\\-", "\u2212"))
out.append("FAKE-FOOTER")
print("\\n".join(out))
"""

FAKE_BIBLE = """#!{python}
# Stand-in for bible -l0 Ge1:1-Re22:21: two books of two chapters, one verse a line.
import random
rng = random.Random(3)
words = "and the lord said unto them behold I am with you always even unto the end of the world".split()
for book in ("Genesis", "Exodus"):
    for chapter in (1, 2):
        print(); print(book, chapter); print()
        for verse in range(1, 12):
            print("  %d %s." % (verse, " ".join(rng.choice(words) for _ in range(14)).capitalize()))
"""


def make_fake_root(root, omit=()):
    """Write a tiny filesystem holding every package of the offline corpus (minus `omit`) under `root`."""
    rng = random.Random(0)
    packages = [p for p in offline_corpus.OFFLINE_PACKAGES if p not in omit]
    status = [f"Package: {p}\nStatus: install ok installed\nVersion: 1.{i}\n" for i, p in enumerate(packages)]
    status.append("Package: removed-thing\nStatus: deinstall ok config-files\nVersion: 9\n")
    write(f"{root}/var/lib/dpkg/status", "\n".join(status))
    for p in packages:
        write(f"{root}/usr/share/doc/{p}/copyright", f"Format: https://www.debian.org/doc/packaging-manuals/"
              f"copyright-format/1.0/\n\nFiles: *\nLicense: TEST-{p}\n The license text of {p}.\n")
    write(f"{root}/usr/share/doc/linux-doc-6.1/copyright", "Files: *\nLicense: GPL-2\n kernel docs\n")
    write(f"{root}/usr/share/doc/python3.11-doc/copyright", "Python docs are under the PSF license.\n")

    write_dictd(root, "gcide", [([f"Word{i}", f"word{i}"], f"Word{i} \\Word{i}\\, n. {{Cross}} reference. [PJC]\n   "
                                 + prose(rng, 300) + f"\n   [1913 Webster] Word{i + 1}\n\n") for i in range(40)])
    write_dictd(root, "foldoc", [([f"term{i}"], f"term{i}\n\n   <jargon> " + prose(rng, 400) + "\n\n") for i in range(15)])
    write_dictd(root, "jargon", [([f"hack{i}"], f"hack{i}\n n.\n\n    " + prose(rng, 400) + "\n\n") for i in range(15)])
    write_dictd(root, "devil", [([f"DEVIL{i}"], f"DEVIL{i}, n.  " + prose(rng, 400) + "\n\n") for i in range(15)])

    for pos, code in (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")):
        lines = ["  1 This software and database is being provided to you, the LICENSEE, by Princeton.  "]
        for i in range(30):
            lines.append(f"{i:08d} 03 {code} 02 {pos}_word{i} 0 other_{pos}{i}(p) 0 000 | {prose(rng, 120)}  ")
        write(f"{root}/usr/share/wordnet/data.{pos}", "\n".join(lines) + "\n")

    docs = f"{root}/usr/share/doc/linux-doc-6.1/Documentation"
    write(f"{docs}/admin-guide/long.rst.gz", gzip.compress(("Long guide\n==========\n\n" + paragraphs(rng, 60)).encode(), mtime=0))
    write(f"{docs}/core/short.txt.gz", gzip.compress(paragraphs(rng, 3).encode(), mtime=0))
    write(f"{docs}/core/stub.rst.gz", gzip.compress(b".. toctree::\n   one\n", mtime=0))  # too short: dropped
    write(f"{docs}/translations/zh_CN/index.rst.gz", gzip.compress(("TRANSLATED " + prose(rng, 900)).encode(), mtime=0))
    write(f"{docs}/bindings/table.yaml.gz", gzip.compress(b"compatible: x\n", mtime=0))

    sources = f"{root}/usr/share/doc/python3.11/html/_sources"
    for name in ("library/os.rst.txt", "tutorial/intro.rst.txt"):
        write(f"{sources}/{name}", ":mod:`os` --- things\n=====================\n\n" + paragraphs(rng, 5))
    os.symlink("../python3.11/html", f"{root}/usr/share/doc/python3.11-doc/html")  # as python3.11-doc ships it

    man_files = []
    for section, name in (("2", "open"), ("3", "printf"), ("7", "pipe")):
        path = f"{root}/usr/share/man/man{section}/{name}.{section}.gz"
        page = f'.TH {name.upper()} {section}\n.SH NAME\n{name} \\- does things\n.SH DESCRIPTION\n' + \
               "\n.PP\n".join(prose(rng, 350) for _ in range(4)) + "\n"
        write(path, gzip.compress(page.encode(), mtime=0))
        man_files.append(path)
    write(f"{root}/usr/share/man/man3/alias.3.gz", gzip.compress(b".so man3/printf.3\n", mtime=0))
    os.symlink("printf.3.gz", f"{root}/usr/share/man/man3/link.3.gz")
    man_files += [f"{root}/usr/share/man/man3/alias.3.gz", f"{root}/usr/share/man/man3/link.3.gz"]
    manpages_dev = [f for f in man_files if "/man2/" in f or "/man3/" in f]
    write_list(root, "manpages", [f for f in man_files if f not in manpages_dev])
    write_list(root, "manpages-dev", manpages_dev)
    write(f"{root}/usr/bin/groff", FAKE_GROFF.format(python=sys.executable), mode=0o755)
    write(f"{root}/usr/bin/bible", FAKE_BIBLE.format(python=sys.executable), mode=0o755)
    write(f"{root}/usr/lib/bible.data", b"compressed text\n")

    fortunes = f"{root}/usr/share/games/fortunes"
    write(f"{fortunes}/fortunes", "\n%\n".join(prose(rng, 200) + "\n\t\t-- Someone" for _ in range(30)) + "\n%\n")
    write(f"{fortunes}/fortunes.dat", b"\x00\x00\x00\x02binary index")
    os.symlink("fortunes", f"{fortunes}/fortunes.u8")
    write(f"{fortunes}/art", "\n%\n".join(("  /\\_/\\  ( o.o )  > ^ <  |||| ___ " * 12) + f"{i}" for i in range(30)))
    write_list(root, "fortunes-min", [f"{fortunes}/fortunes", f"{fortunes}/fortunes.dat", f"{fortunes}/fortunes.u8"])
    write_list(root, "fortunes", [f"{fortunes}/art"])

    write(f"{root}/usr/share/debian-reference/debian-reference.en.txt.gz",
          gzip.compress(("Debian Reference\n\n" + paragraphs(rng, 12)).encode(), mtime=0))
    return root


def write_list(root, package, paths):
    """dpkg's record of the files a package installed: absolute paths as on the real system."""
    write(f"{root}/var/lib/dpkg/info/{package}.list", "".join(p[len(str(root)):] + "\n" for p in paths))


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return str(make_fake_root(str(tmp_path_factory.mktemp("root"))))


def read_all(data_dir):
    return [t for p in list_parquet_files(data_dir) for t in pq.read_table(p).column("text").to_pylist()]


# -----------------------------------------------------------------------------
# The offline corpus, from the fake root

def test_offline_build_writes_valid_shards(fake_root, tmp_path):
    data_dir = str(tmp_path / "base_data")
    manifest = build_offline_corpus(data_dir, root=fake_root, num_workers=2, num_shards=4)
    paths = list_parquet_files(data_dir)
    assert [os.path.basename(p) for p in paths] == [f"shard_{i:05d}.parquet" for i in range(4)]
    for path in paths:
        table = pq.read_table(path)
        assert table.schema.names == ["text"] and table.schema.field("text").type == pa.string()
    docs = read_all(data_dir)
    assert len(docs) == manifest["total_documents"] == len(set(docs))
    assert all(offline_corpus.MIN_DOC_CHARS <= len(d) <= offline_corpus.MAX_DOC_CHARS for d in docs)
    assert [s["split"] for s in manifest["shards"]] == ["train"] * 3 + ["val"]
    assert sum(s["documents"] for s in manifest["sources"].values()) == len(docs)
    assert all(manifest["sources"][s.name]["documents"] > 0 for s in offline_corpus.CORPUS_SOURCES), manifest["sources"]
    assert manifest["packages"]["dict-gcide"] == "1.%d" % offline_corpus.OFFLINE_PACKAGES.index("dict-gcide")
    text = "\n".join(docs)
    # markup and duplicates are gone, excluded files are not read
    for absent in ("[1913 Webster]", "[PJC]", "\nWord2\n", "\\Word1\\", "{Cross}", "00-database", "This file was converted",
                   "FAKE-HEADER", "FAKE-FOOTER", "\b", "TRANSLATED", "compatible: x", "( o.o )", "toctree", "LICENSEE"):
        assert absent not in text, absent
    for present in ("Word1, n. Cross reference.", "DESCRIPTION", "Genesis 1", "-- Someone", "word3, other noun3 (noun):",
                    "Long guide", "Debian Reference", "DEVIL3, n."):
        assert present in text, present
    assert text.count("Word7, n.") == 1  # an entry with two headwords is read once
    assert text.count("printf - does things") == 1  # the .so alias and the symbolic link are not read again
    licenses = open(os.path.join(data_dir, "LICENSES.md")).read()
    assert "License: TEST-dict-gcide" in licenses and "Python docs are under the PSF license." in licenses
    on_disk = json.load(open(os.path.join(data_dir, OFFLINE_MANIFEST)))
    assert on_disk == manifest


def test_offline_build_is_deterministic(fake_root, tmp_path):
    digests = []
    for name in ("a", "b"):
        data_dir = str(tmp_path / name)
        build_offline_corpus(data_dir, root=fake_root, num_workers=1 if name == "a" else 2, num_shards=3)
        files = sorted(os.listdir(data_dir))
        digests.append({f: hashlib.sha256(open(os.path.join(data_dir, f), "rb").read()).hexdigest() for f in files})
    assert digests[0] == digests[1]
    assert not any(f.endswith(".tmp") for f in digests[0])


def test_offline_build_skips_a_finished_build_and_rebuilds_with_force(fake_root, tmp_path):
    data_dir = str(tmp_path / "base_data")
    build_offline_corpus(data_dir, root=fake_root, num_shards=3)
    shard = list_parquet_files(data_dir)[0]
    os.utime(shard, (1, 1))
    build_offline_corpus(data_dir, root=fake_root, num_shards=3)
    assert os.stat(shard).st_mtime == 1
    build_offline_corpus(data_dir, root=fake_root, num_shards=2, force=True)
    assert len(list_parquet_files(data_dir)) == 2  # the old third shard is gone
    assert os.stat(list_parquet_files(data_dir)[0]).st_mtime != 1


def test_missing_packages_name_the_apt_get_command(tmp_path):
    root = make_fake_root(str(tmp_path / "root"), omit=("dict-gcide", "groff-base"))
    with pytest.raises(DatasetError, match=r"apt-get install -y dict-gcide groff-base\n") as e:
        build_offline_corpus(str(tmp_path / "data"), root=root)
    assert "--allow-partial" in str(e.value)
    manifest = build_offline_corpus(str(tmp_path / "data"), root=root, allow_partial=True, num_shards=2)
    assert "gcide" not in manifest["sources"] and "man-pages" not in manifest["sources"]
    assert manifest["sources"]["wordnet"]["documents"] > 0


def test_no_package_database_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"no Debian package database.*-n 8"):
        build_offline_corpus(str(tmp_path / "data"), root=str(tmp_path))


def test_offline_build_refuses_a_folder_of_downloaded_shards(fake_root, tmp_path):
    data_dir = tmp_path / "base_data"
    data_dir.mkdir()
    pq.write_table(pa.table({"text": ["fineweb"]}), data_dir / "shard_00000.parquet")
    with pytest.raises(DatasetError, match="not the offline corpus"):
        build_offline_corpus(str(data_dir), root=fake_root)


def test_cli_offline_build_and_user_errors(fake_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    main(["--root", fake_root, "-w", "1"])
    assert len(list_parquet_files()) == offline_corpus.OFFLINE_NUM_SHARDS
    assert "total:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: no Debian package database"):  # a message, not a traceback
        main(["--root", str(tmp_path / "empty"), "--force"])
    with pytest.raises(SystemExit) as e:
        main(["-w", "0"])
    assert e.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_offline_packages_file_lists_every_package():
    with open(os.path.join(REPO, "dev", "offline_packages.txt")) as f:
        assert f.read().split() == offline_corpus.OFFLINE_PACKAGES


def test_man_pages_render_in_one_groff_run_or_one_run_per_page(fake_root, monkeypatch):
    runs = []
    run_groff = offline_corpus.run_groff
    monkeypatch.setattr(offline_corpus, "run_groff", lambda root, source: runs.append(source) or run_groff(root, source))
    pages = [f".TH P{i} 1\n.SH NAME\npage {i} text\n".encode() for i in range(3)]
    assert offline_corpus.render_man_pages(fake_root, pages) == [f"NAME\n       page {i} text" for i in range(3)]
    assert len(runs) == 1
    pages[1] += b".de XX\n"  # an unterminated macro swallows the separator: every page is rendered on its own
    assert offline_corpus.render_man_pages(fake_root, pages) == [f"NAME\n       page {i} text" for i in range(3)]
    assert len(runs) == 1 + 1 + 3


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed (apt-get install -y groff-base)")
def test_real_groff_renders_a_batch_of_pages():
    pages = [f'.TH T{i} 1\n.SH NAME\nt{i} \\- a test page\n.SH DESCRIPTION\n.B Bold\nand plain text, a sentence '
             f'long enough to be filled and wrapped across several lines of the rendered page number {i}.\n'.encode()
             for i in range(3)]
    root = os.path.dirname(os.path.dirname(os.path.dirname(shutil.which("groff"))))
    rendered = offline_corpus.render_man_pages(root, pages)
    assert len(rendered) == 3
    for i, page in enumerate(rendered):
        assert page.lstrip("\n").startswith("NAME") and f"t{i} - a test page" in page and f"number {i}." in page
        assert "\b" not in page and "\x1b" not in page and "T0(1)" not in page


# -----------------------------------------------------------------------------
# Text helpers

def test_pack_units_balances_and_bounds_documents():
    paragraphs_ = ["x" * 1000] * 9  # 9,000 characters + separators: two documents of ~4,500
    docs = pack_units(paragraphs_, max_chars=8000)
    assert len(docs) == 2 and all(len(d) <= 8000 for d in docs) and abs(len(docs[0]) - len(docs[1])) <= 1002
    assert "".join(docs).replace("\n", "") == "x" * 9000
    docs = pack_units(["line\n" * 3000 + "y" * 20000], max_chars=8000)  # a unit too long: cut at lines, then mid-line
    assert all(len(d) <= 8000 for d in docs) and "".join(docs).count("y") == 20000
    assert pack_units(["a", "b", "c"], max_chars=10, target_chars=3) == ["a\n\nb", "c"]


def test_keep_document_drops_stubs_and_symbol_soup():
    assert offline_corpus.keep_document("Plain English words make a document. " * 20)
    assert not offline_corpus.keep_document("Too short.")
    assert not offline_corpus.keep_document("| 0x00 | 0xff | -- |\n" * 40)


def test_decode_dictd_number():
    assert [offline_corpus.decode_dictd_number(s) for s in ("A", "B", "/", "BA", "Kj")] == [0, 1, 63, 64, 10 * 64 + 35]
    assert all(offline_corpus.decode_dictd_number(encode_dictd_number(n)) == n for n in (0, 5, 64, 4095, 13527370))


# -----------------------------------------------------------------------------
# The real corpus, from the Debian packages installed on this machine

@pytest.mark.slow
def test_offline_corpus_from_installed_packages(tmp_path, monkeypatch):
    try:
        offline_corpus.select_sources("/", allow_partial=False)
    except DatasetError as e:
        pytest.skip(f"the Debian packages of the offline corpus are not installed: {e}")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    manifest = build_offline_corpus()
    assert 80e6 < manifest["total_bytes"] < 120e6, manifest["total_bytes"]
    assert 15_000 < manifest["total_documents"] < 30_000, manifest["total_documents"]
    assert all(manifest["sources"][s.name]["documents"] > 0 for s in offline_corpus.CORPUS_SOURCES)
    assert len(list_parquet_files()) == offline_corpus.OFFLINE_NUM_SHARDS
    val = [d for batch in parquets_iter_batched("val") for d in batch]
    assert len(val) == manifest["shards"][-1]["documents"] > 1000
    assert all(offline_corpus.MIN_DOC_CHARS <= len(d) <= offline_corpus.MAX_DOC_CHARS and "\b" not in d for d in val)
    assert any("SYNOPSIS" in d for d in val) and not any("[1913 Webster]" in d for d in val)
