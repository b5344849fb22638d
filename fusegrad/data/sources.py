"""Records and documents from datasets as they are published, read as a stream: a corpus never has to fit in
memory. `Records` gives a dataset's records (fine-tuning data); `Documents` the text in them (pretraining).

Each file kind, by suffix:
- text (`.txt`, or any file named explicitly): one document, or several where the separator stands between
  them (default `<|endoftext|>`, as in TinyStoriesV2-GPT4-train.txt); separated documents are stripped of the
  whitespace around them, a file without the separator is one document exactly as it is;
- JSON Lines (`.jsonl`, `.ndjson`, or a `.json` that starts with `{`): one record a line;
- JSON (`.json` that starts with `[`): a list of records, read a record at a time (TinyStories_all_data's
  data00.json ...);
- Parquet (`.parquet`, needs pyarrow): a row group at a time; Arrow (`.arrow`: what Hugging Face `datasets` keeps
  in its cache and writes with save_to_disk, IPC stream or file format): a record batch at a time;
- any of these compressed (`.gz`, `.bz2`, `.xz`, `.zst` with zstandard), and tar archives of them (`.tar`,
  `.tar.gz`, `.tgz`, `.tar.bz2`, `.tar.xz`, `.tar.zst`), whose members are read in archive order.
In a directory, a `.json` file that is neither a list nor JSON Lines (a model's config.json, a tokenizer.json)
is skipped with a warning; named alone, it is an error. A record is an object (to Documents, a string too,
or an object whose `text_field`, default "text", holds the document; empty documents and null fields are
skipped). A file that gives no record or document at all is an error.

>>> import tempfile, os, json
>>> d = tempfile.mkdtemp()
>>> with open(os.path.join(d, "a.jsonl"), "w") as f:
...     _ = f.write(json.dumps({"story": "One."}) + "\\n" + json.dumps({"story": "Two."}) + "\\n")
>>> list(Documents(os.path.join(d, "a.jsonl"), text_field="story"))
['One.', 'Two.']
"""
from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
import os
import re
import sys
import tarfile
import warnings
import zlib

from fusegrad.core.errors import ConfigError, FormatError

DEFAULT_SEPARATOR = "<|endoftext|>"
MAX_DOCUMENT_CHARS = 16 << 20  # a tokenizer holds ~150 bytes per character of one text while encoding it
_BLOCK = 1 << 20
_COMPRESSED = {".gz": lambda f: gzip.GzipFile(fileobj=f), ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile, ".zst": None}
_KINDS = {".txt": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
          ".arrow": "arrow"}
_TAR = re.compile(r"\.(tar|tgz|tar\.gz|tar\.bz2|tar\.xz|tar\.zst|tzst)$")
_ESCAPES = re.compile(r"\\([ntr\\])")


def kind_of(name: str) -> tuple[str, str] | None:
    """(kind, compression suffix or '') of a file name: ('json', '.gz') for x.json.gz; ('tar', '') for an
    archive (('tar', '.zst') for one tarfile cannot decompress itself); None for a name of no known kind."""
    if _TAR.search(name):
        return "tar", ".zst" if name.endswith("zst") else ""
    stem, ext = os.path.splitext(name)
    comp = ext if ext in _COMPRESSED else ""
    if comp:
        ext = os.path.splitext(stem)[1]
    return (_KINDS[ext], comp) if ext in _KINDS else None


def unescape(separator: str) -> str:
    r"""A separator as written on a command line or in YAML: \n, \t, \r and \\ stand for themselves."""
    return _ESCAPES.sub(lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], separator)


class Records:
    """The records (JSON objects, Parquet or Arrow rows, as dicts) of `inputs` (a file, a directory of files of
    known kinds found recursively and sorted, or a list of files) as (record, where) pairs, `where` naming the
    file and the line, record or row; iterable any number of times, each time reading the files again.

    allow_nan: whether JSON's NaN and Infinity (not JSON, but what Python's json writes) are read.
    progress: called with the number of bytes of input files (as on disk) read since its last call."""

    what = "records"

    def __init__(self, inputs, allow_nan: bool = True):
        self.paths = _input_paths(inputs)
        self.listed = not isinstance(inputs, (list, tuple)) and os.path.isdir(inputs)  # found, not named
        self.allow_nan = allow_nan
        self.max_document_chars = MAX_DOCUMENT_CHARS  # a record's JSON is read within twice this
        self.progress = lambda n: None

    def total_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.paths)

    def __iter__(self):
        skipped, found = [], False
        for path in self.paths:
            kind, comp = kind_of(path) or ("text", "")
            try:
                raw = open(path, "rb")
            except FileNotFoundError:
                raise FormatError(f"{path}: input file does not exist") from None
            except OSError as e:
                raise FormatError(f"{path}: cannot read input file: {e.strerror}") from None
            with raw:
                stream = io.BufferedReader(_Counting(raw, lambda n: self.progress(n)), _BLOCK)
                try:
                    items = self._archive(stream, path, comp) if kind == "tar" else self._file(stream, path, kind, comp)
                    for item in items:
                        found = True
                        yield item
                except NotRecords as e:
                    if not self.listed:
                        raise
                    skipped.append(str(e))
                    warnings.warn(f"fusegrad: skipped {e}", stacklevel=2)
        if not found:
            raise FormatError(f"no {self.what} in {len(self.paths)} files; skipped: {'; '.join(skipped)}")

    def _archive(self, stream, path, comp):
        found = False
        try:
            with tarfile.open(fileobj=_decompress(stream, comp, path) if comp else stream, mode="r|*") as tar:
                for member in tar:
                    kind = kind_of(member.name)
                    if member.isfile() and kind is not None and kind[0] != "tar":
                        found = True
                        yield from self._file(tar.extractfile(member), f"{path}/{member.name}", *kind)
        except (tarfile.TarError, TypeError, *_read_errors()) as e:  # TypeError: tarfile on a gzip header cut short
            raise FormatError(f"{path}: not a readable tar archive: {e}") from None
        if not found:
            raise FormatError(f"{path}: the archive holds no files of a known kind "
                              f"({', '.join(sorted(_KINDS))}, or those compressed)")

    def _file(self, stream, name, kind, comp):
        """The items of one file; `stream` reads its bytes as stored."""
        n = 0
        try:
            for item in self._items(stream, name, kind, comp):
                n += 1
                yield item
        except _read_errors() as e:
            raise FormatError(f"{name}: cannot decompress or read it: {e}") from None
        if n == 0:
            raise FormatError(f"{name}: {self._nothing(kind)}")

    def _items(self, stream, name, kind, comp):
        if kind == "text":
            raise NotRecords(f"{name}: a text file holds no records (JSON Lines, JSON, Parquet, Arrow)")
        for i, (record, where) in enumerate(self._records(stream, name, kind, comp)):
            if not isinstance(record, dict):
                raise (FormatError if i else NotRecords)(f"{where} is a JSON {type(record).__name__}, not an object")
            yield record, where

    def _nothing(self, kind) -> str:
        return "holds no records"

    def _records(self, stream, name, kind, comp, columns=None, check=None):
        """(record, where) of a JSON Lines, JSON, Parquet or Arrow file; for the last two only `columns` (None:
        all) are read, after check(pyarrow, schema)."""
        if kind in ("parquet", "arrow"):  # pyarrow seeks: a plain file as it is, else its bytes in memory
            plain = comp == "" and stream.seekable()
            source = stream if plain else io.BytesIO(_decompress(stream, comp, name).read() if comp else stream.read())
            return _columnar(source, name, kind, columns, check)
        stream = _decompress(stream, comp, name) if comp else stream
        if kind == "json":  # a list of records, or JSON Lines named .json (as many datasets are)
            if stream.peek(64)[:64].lstrip().startswith(b"{"):
                return self._jsonl(stream, name, named_json=True)
            return self._json(stream, name)
        return self._jsonl(stream, name)

    def _jsonl(self, stream, name, named_json=False):
        constant = None if self.allow_nan else _no_constant
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"), parse_constant=constant)
            except UnicodeDecodeError as e:
                raise FormatError(f"{name}: line {lineno} is not UTF-8 text ({e.reason})") from None
            except json.JSONDecodeError as e:
                if named_json and lineno == 1:
                    raise NotRecords(f"{name}: a .json dataset is a list of records ([...]) or JSON Lines (a "
                                     f"record a line); its first line is not a record: {e.msg.removesuffix(' at')}"
                                     ) from None
                raise FormatError(f"{name}: line {lineno} is not a JSON record: {e.msg.removesuffix(' at')} "
                                  f"(column {e.colno})") from None
            except ValueError as e:  # _no_constant
                raise FormatError(f"{name}: line {lineno} is not a JSON record: {e}") from None
            yield record, f"{name}: line {lineno}"

    def _json(self, stream, name):
        """A top-level JSON list, decoded a record at a time from a window of the file."""
        decoder = json.JSONDecoder(parse_constant=None if self.allow_nan else _no_constant)
        blocks = _utf8_blocks(stream, name)
        buf, pos, index, done = "", 0, 0, False

        def more():
            nonlocal buf, pos, done
            block = next(blocks, None)
            done = block is None
            buf, pos = buf[pos:] + (block or ""), 0
            return not done

        def skip_space():
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        if skip_space() != "[":
            raise NotRecords(f"{name}: a .json dataset is a list of records ([...]) or JSON Lines (a record a line)")
        pos += 1
        while True:
            c = skip_space()
            if c == "]":
                return
            if index and c != ",":
                raise FormatError(f"{name}: record {index - 1} is not followed by ',' or ']' (found "
                                  f"{c or 'the end'!r})")
            if index:
                pos += 1
                skip_space()
            while True:
                try:
                    record, pos = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if len(buf) - pos > self.max_document_chars * 2 or not more():
                        raise FormatError(f"{name}: record {index} is not valid JSON: {e.msg}") from None
                except ValueError as e:  # _no_constant
                    raise FormatError(f"{name}: record {index} is not valid JSON: {e}") from None
            yield record, f"{name}: record {index}"
            index += 1


class Documents(Records):
    """The documents (str) of `inputs`, as Records reads them, and of text files split at `separator`; a
    record's text is its `text_field`."""

    what = "documents"

    def __init__(self, inputs, text_field: str = "text", separator: str = DEFAULT_SEPARATOR,
                 max_document_chars: int = MAX_DOCUMENT_CHARS):
        if not text_field:
            raise ConfigError("prepare: text_field must name a field, got ''")
        super().__init__(inputs)
        self.text_field, self.separator = text_field, unescape(separator)
        self.max_document_chars = max_document_chars

    def _items(self, stream, name, kind, comp):
        if kind == "text":
            docs = self._text(_decompress(stream, comp, name) if comp else stream, name)
        else:
            records = self._records(stream, name, kind, comp, [self.text_field], self._check_text_column)
            docs = (self._record_text(r, where, i == 0) for i, (r, where) in enumerate(records))
        n = 0
        for doc in docs:
            if len(doc) > self.max_document_chars:
                raise FormatError(f"{name}: document {n + 1} holds {len(doc)} characters, more than "
                                  f"{self.max_document_chars} (a text file without the separator "
                                  f"{self.separator!r} is one document); give one document per file, put "
                                  f"the separator between documents, or choose another separator "
                                  f"(e.g. a blank line: --separator '\\n\\n')")
            if doc.strip():
                n += 1
                yield doc

    def _nothing(self, kind) -> str:
        if kind == "text":
            return "text file is empty"
        return f"holds no documents (no record has text in {self.text_field!r})"

    def _text(self, stream, name):
        sep, k = self.separator, max(len(self.separator) - 1, 0)
        parts, size, tail, separated = [], 0, "", False
        for block in _utf8_blocks(stream, name):
            pieces = (tail + block).split(sep) if sep else [tail + block]
            for piece in pieces[:-1]:
                separated = True
                yield "".join(parts + [piece]).strip()
                parts, size = [], 0
            cut = max(len(pieces[-1]) - k, 0)  # the last k characters may begin a separator the next block ends
            parts.append(pieces[-1][:cut])
            tail, size = pieces[-1][cut:], size + cut
            if size > self.max_document_chars:
                yield "".join(parts)  # longer than any document may be: _file refuses it, naming it
        last = "".join(parts) + tail
        yield last.strip() if separated else last

    def _check_text_column(self, pa, schema, name):
        if self.text_field not in schema.names:
            text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
            raise FormatError(f"{name}: no column {self.text_field!r} (its text columns: {', '.join(text) or 'none'}); "
                              f"name the column with --text_field")
        column = schema.field(self.text_field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise FormatError(f"{name}: column {self.text_field!r} holds {column.type}, not text")

    def _record_text(self, record, where, first):
        """The text of a record; the first record of a file decides whether it is a dataset at all (NotRecords)."""
        error = NotRecords if first else FormatError
        if isinstance(record, str):
            return record
        if not isinstance(record, dict):
            raise error(f"{where} is a JSON {type(record).__name__}, not text or an object with a "
                              f"{self.text_field!r} field")
        text = record.get(self.text_field)
        if isinstance(text, str):
            return text
        if text is None and self.text_field in record:
            return ""  # null: skipped, as an empty text is
        if text is None:
            fields = [k for k, v in record.items() if isinstance(v, str)]
            raise error(f"{where} has no {self.text_field!r} field (its text fields: "
                              f"{', '.join(fields) or 'none'}); name the field with --text_field")
        raise FormatError(f"{where}: field {self.text_field!r} holds a JSON {type(text).__name__}, not text")


def _columnar(source, name, kind, columns, check):
    """(row as a dict, where) of a Parquet or Arrow file, a row group / record batch at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise FormatError(f"{name}: reading {kind.capitalize()} needs pyarrow: pip install pyarrow") from None
    try:
        if kind == "parquet":
            pf = pq.ParquetFile(source)
            schema, batches = pf.schema_arrow, pf.iter_batches(batch_size=1024, columns=columns)
        else:
            is_file = source.read(6) == b"ARROW1"  # the IPC file format; else the stream format datasets writes
            source.seek(0)
            reader = pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)
            schema = reader.schema
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file else reader
        if check is not None:
            check(pa, schema, name)
        row = 0
        for batch in batches:
            batch.validate(full=True)  # an Arrow file's offsets are not checked as it is read: bad ones would crash
            if columns is not None and kind == "arrow":
                batch = batch.select(columns)
            for record in batch.to_pylist():
                yield record, f"{name}: row {row}"
                row += 1
    except FormatError:
        raise
    except (pa.ArrowException, ValueError, OSError, MemoryError, OverflowError) as e:  # ValueError: ArrowInvalid,
        # text that is not UTF-8; MemoryError, OverflowError: a length that is not the file's
        raise FormatError(f"{name}: not a readable {kind.capitalize()} file: {type(e).__name__}: {e}") from None


def _no_constant(name):
    raise ValueError(f"{name} is not a finite number")


class NotRecords(FormatError):
    """A JSON file that is not a dataset of records with the text field (a config.json, a run's metrics.jsonl):
    skipped when a directory is read, with a warning."""


def _input_paths(inputs) -> list[str]:
    if not isinstance(inputs, (list, tuple)) and os.path.isdir(inputs):
        paths = sorted(p for p in glob.glob(os.path.join(os.fspath(inputs), "**", "*"), recursive=True)
                       if os.path.isfile(p) and kind_of(p) is not None)
        if not paths:
            raise FormatError(f"{inputs}: directory holds no .txt, .jsonl, .json, .parquet or .arrow files (nor those "
                              f"compressed, nor tar archives of them)")
        return paths
    paths = [os.fspath(p) for p in inputs] if isinstance(inputs, (list, tuple)) else [os.fspath(inputs)]
    if not paths:
        raise FormatError("prepare: the list of input files is empty")
    for path in paths:
        if not os.path.isfile(path):
            raise FormatError(f"{path}: {'not a file' if os.path.exists(path) else 'input file does not exist'}")
    return paths


def _decompress(stream, comp, name):
    if comp != ".zst":
        return io.BufferedReader(_COMPRESSED[comp](stream), _BLOCK)
    try:
        import zstandard
    except ImportError:
        raise FormatError(f"{name}: reading .zst needs zstandard: pip install zstandard") from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True), _BLOCK)


def _utf8_blocks(stream, name):
    """str blocks of a byte stream; FormatError naming the line and byte of the first sequence not UTF-8."""
    decoder, lines, offset = codecs.getincrementaldecoder("utf-8")(), 0, 0
    while True:
        chunk = stream.read(_BLOCK)
        pending = decoder.getstate()[0]
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            line = lines + (pending + chunk).count(b"\n", 0, e.start) + 1
            raise FormatError(f"{name}: line {line} is not UTF-8 text (byte {offset - len(pending) + e.start}: "
                              f"{e.reason})") from None
        lines, offset = lines + chunk.count(b"\n"), offset + len(chunk)
        if text:
            yield text
        if not chunk:
            return


class _Counting(io.RawIOBase):
    """A binary file that reports how many bytes are read from it."""

    def __init__(self, f, report):
        self.f, self.report = f, report

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        self.report(n or 0)
        return n

    def seekable(self):
        return self.f.seekable()

    def seek(self, offset, whence=io.SEEK_SET):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()


def _read_errors() -> tuple:
    """What reading a truncated or corrupt (compressed) file raises."""
    zstd = sys.modules.get("zstandard")
    return (EOFError, OSError, lzma.LZMAError, zlib.error) + ((zstd.ZstdError,) if zstd else ())
