"""The embedded default corpus: English prose harvested from the Python standard library.

`default_corpus_lines()` yields about 2 MB of text made of, in this order,

1. the topic pages of the Python language reference that `pydoc` ships in `pydoc_data.topics`
   (the text behind `help("if")`, `help("NUMBERS")`, ...);
2. for each module of the fixed list `DOCSTRING_MODULES`, in list order:
   - the docstrings of the module and of its classes, functions and methods (members sorted by
     name; only members defined in that module), then
   - the full-line comment blocks of the module's source file, in file order.

Every CPython installation carries both, so the demo pretraining config and the tests run with no
download on any machine. Each yielded line is one paragraph: a blank line ends a paragraph, the
hard-wrapped lines inside it are joined with single spaces, and a paragraph seen before is not
repeated. The order is fixed, so the text is identical from run to run for a given Python version
(other versions carry slightly different docstrings and comments). It is a smoke-test corpus for the
pipeline, not a real pretraining corpus: technical English full of identifiers and code fragments.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import re
from collections.abc import Iterator

# Modules present in every CPython >= 3.11 build. Modules that define their members conditionally on
# the OS (os, signal, selectors, time, sys, subprocess, multiprocessing.connection, ...) or that need
# optional C libraries (ssl, sqlite3, lzma, ctypes, ...) are left out so the text does not depend on
# the platform or on how Python was built.
DOCSTRING_MODULES: tuple[str, ...] = (
    "builtins", "abc", "argparse", "ast", "asyncio.base_events", "asyncio.base_futures",
    "asyncio.base_subprocess", "asyncio.base_tasks", "asyncio.coroutines", "asyncio.events",
    "asyncio.exceptions", "asyncio.format_helpers", "asyncio.futures", "asyncio.locks",
    "asyncio.proactor_events", "asyncio.protocols", "asyncio.queues", "asyncio.runners",
    "asyncio.selector_events", "asyncio.sslproto", "asyncio.staggered", "asyncio.streams",
    "asyncio.subprocess", "asyncio.taskgroups", "asyncio.tasks", "asyncio.threads",
    "asyncio.timeouts", "asyncio.transports", "asyncio.trsock", "base64", "bdb", "bisect",
    "calendar", "cmd", "code", "codecs", "codeop", "collections", "collections.abc", "colorsys",
    "compileall", "concurrent.futures", "concurrent.futures._base", "concurrent.futures.process",
    "concurrent.futures.thread", "configparser", "contextlib", "copy", "copyreg", "cProfile", "csv",
    "dataclasses", "datetime", "dbm.dumb", "difflib", "dis", "doctest",
    "email._header_value_parser", "email._parseaddr", "email._policybase", "email.base64mime",
    "email.charset", "email.contentmanager", "email.encoders", "email.errors", "email.feedparser",
    "email.generator", "email.header", "email.headerregistry", "email.iterators", "email.message",
    "email.parser", "email.policy", "email.quoprimime", "email.utils", "encodings.idna",
    "encodings.punycode", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "graphlib", "heapq", "hmac", "html", "html.parser",
    "http", "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib",
    "importlib.abc", "importlib.machinery", "importlib.metadata", "importlib.resources",
    "importlib.util", "inspect", "io", "ipaddress", "itertools", "json", "json.decoder",
    "json.encoder", "json.scanner", "json.tool", "keyword", "linecache", "logging",
    "logging.config", "logging.handlers", "mailbox", "math", "mimetypes", "modulefinder",
    "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.process",
    "multiprocessing.queues", "multiprocessing.util", "netrc", "numbers", "opcode", "operator",
    "optparse", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri",
    "random", "re", "re._compiler", "re._parser", "reprlib", "rlcompleter", "runpy", "sched",
    "secrets", "shelve", "shlex", "smtplib", "socketserver", "statistics", "string", "stringprep",
    "struct", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "token", "tokenize", "tomllib._parser", "trace", "traceback", "tracemalloc", "types",
    "typing", "unittest.async_case", "unittest.case", "unittest.loader", "unittest.main",
    "unittest.mock", "unittest.result", "unittest.runner", "unittest.signals", "unittest.suite",
    "unittest.util", "urllib.error", "urllib.parse", "urllib.request", "urllib.response",
    "urllib.robotparser", "uuid", "warnings", "wave", "weakref", "wsgiref.handlers",
    "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate", "xml.dom",
    "xml.dom.expatbuilder", "xml.dom.minicompat", "xml.dom.minidom", "xml.dom.pulldom",
    "xml.dom.xmlbuilder", "xml.etree.ElementInclude", "xml.etree.ElementPath",
    "xml.etree.ElementTree", "xml.sax.expatreader", "xml.sax.handler", "xml.sax.saxutils",
    "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport",
    "zoneinfo", "_collections_abc", "_compat_pickle", "_markupbase", "_pydecimal", "_pyio",
    "_strptime", "_threading_local", "_weakrefset",
)

# Deep enough for module -> class -> method -> nested class.
_MAX_MEMBER_DEPTH = 3

_WHITESPACE_RUN = re.compile(r"\s+")
_BLANK_LINE = re.compile(r"\n\s*\n")
_FULL_LINE_COMMENT = re.compile(r"[ \t]*#(.*)")
_LETTER = re.compile(r"[^\W\d_]")


def _paragraphs(text: str) -> Iterator[str]:
    """Split a docstring or help page into single-line paragraphs with collapsed whitespace."""
    for block in _BLANK_LINE.split(inspect.cleandoc(text)):
        paragraph = _WHITESPACE_RUN.sub(" ", block).strip()
        if paragraph:
            yield paragraph


def _docstrings(obj: object, module_name: str, depth: int, visited: set[int]) -> Iterator[str]:
    """Depth-first docstrings of `obj` and of its members defined in `module_name`."""
    if id(obj) in visited:
        return
    visited.add(id(obj))
    doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str):
        yield doc
    if depth >= _MAX_MEMBER_DEPTH or not (inspect.ismodule(obj) or inspect.isclass(obj)):
        return
    for name, member in sorted(vars(obj).items()):
        # Dunder methods mostly repeat the same one-liners ("Return self==value.").
        if name.startswith("__") and name != "__init__":
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        elif isinstance(member, property):
            member = member.fget
        if not (inspect.isroutine(member) or inspect.isclass(member)):
            continue
        # Re-exported names belong to another module's text (and would make the order depend on
        # import order); C method descriptors carry no __module__ and belong here.
        if getattr(member, "__module__", module_name) != module_name:
            continue
        yield from _docstrings(member, module_name, depth + 1, visited)


def _comment_blocks(source_path: str) -> Iterator[str]:
    """Runs of consecutive full-line `#` comments of a source file, one paragraph per run.

    A comment line holding only `#` also ends a run. Trailing comments after code are skipped:
    they are mostly terse notes, and finding them needs a tokenizer.
    """
    block: list[str] = []
    with open(source_path, encoding="utf-8") as source:
        for line in source:
            comment = _FULL_LINE_COMMENT.fullmatch(line.rstrip("\n"))
            text = comment.group(1).strip() if comment else ""
            if text:
                block.append(text)
            elif block:
                yield " ".join(block)
                block = []
    if block:
        yield " ".join(block)


def _module_texts(module_name: str, visited: set[int]) -> Iterator[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"debertax/corpus.py: standard-library module {module_name!r} needed by the embedded "
            f"default corpus cannot be imported: {error}"
        ) from error
    yield from _docstrings(module, module_name, 0, visited)
    source_path = getattr(module, "__file__", None)
    if source_path and source_path.endswith(".py"):
        yield from _comment_blocks(source_path)


def default_corpus_lines() -> Iterator[str]:
    """Yield the embedded corpus one paragraph per line, in a fixed order (see module docstring).

    Takes about half a second. Raises ImportError naming the module if one of
    `DOCSTRING_MODULES` is missing from this Python installation.
    """
    from pydoc_data.topics import topics

    seen_paragraphs: set[str] = set()
    visited: set[int] = set()
    texts = itertools.chain(
        (topics[name] for name in sorted(topics)),
        itertools.chain.from_iterable(_module_texts(name, visited) for name in DOCSTRING_MODULES),
    )
    for text in texts:
        for paragraph in _paragraphs(text):
            # Rulers and separators ("# -----") carry no words.
            if paragraph in seen_paragraphs or not _LETTER.search(paragraph):
                continue
            seen_paragraphs.add(paragraph)
            yield paragraph
