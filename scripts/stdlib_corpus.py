"""The standard-library text behind minift's embedded default: one place for what is read.

scripts/pretrain_tiny.py pretrains minift-tiny on the standard library's own Python source
(code, comments, docstrings and its test suite: `corpus_files()`) and on `pydoc_data.topics`
(the language reference that `help("assert")` prints). scripts/make_dataset.py builds the
fine-tuning tasks from the signatures and docstrings of TASK_MODULES. No source or test file
of a task module is in the corpus (`corpus_files` leaves them out, `check_disjoint` asserts
it), so the tasks ask the model about functions whose code and documentation it never read.

Only modules present in every CPython from 3.10 to 3.13 are listed (nothing deprecated
by PEP 594, no tkinter), and none with import side effects. The built assets are
committed, so these lists only matter when rebuilding them.
"""
from __future__ import annotations

import importlib
import inspect
import re
import sysconfig
import warnings
from pathlib import Path

# Pretraining: the language itself, text processing, introspection, concurrency, testing.
PRETRAIN_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio.base_events", "asyncio.events",
    "asyncio.futures", "asyncio.locks", "asyncio.queues", "asyncio.streams",
    "asyncio.subprocess", "asyncio.tasks", "asyncio.transports", "atexit", "bdb",
    "builtins", "cmath", "code", "codecs", "codeop", "collections", "collections.abc",
    "concurrent.futures.process", "concurrent.futures.thread", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "dataclasses", "datetime",
    "decimal", "difflib", "dis", "doctest", "enum", "functools", "gettext", "graphlib",
    "importlib.abc", "importlib.machinery", "importlib.metadata", "importlib.util",
    "inspect", "io", "itertools", "json", "json.decoder", "json.encoder", "keyword",
    "linecache", "locale", "logging", "logging.config", "logging.handlers", "marshal",
    "math", "modulefinder", "multiprocessing.connection", "multiprocessing.managers",
    "multiprocessing.pool", "multiprocessing.queues", "multiprocessing.synchronize",
    "numbers", "operator", "optparse", "pdb", "pickle", "pickletools", "pkgutil",
    "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "re", "reprlib",
    "rlcompleter", "runpy", "sched", "site", "string", "struct", "symtable", "sys",
    "sysconfig", "threading", "time", "timeit", "token", "tokenize", "trace",
    "traceback", "tracemalloc", "types", "typing", "unittest.case", "unittest.loader",
    "unittest.main", "unittest.mock", "unittest.result", "unittest.runner",
    "unittest.suite", "warnings", "weakref", "zipapp",
)

# The task: files and archives, data formats, the internet, numbers, dates and randomness.
TASK_MODULES = (
    "base64", "bz2", "calendar", "cmd", "csv", "email.charset", "email.feedparser",
    "email.generator", "email.header", "email.headerregistry", "email.message",
    "email.parser", "email.policy", "email.utils", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "getopt", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http.client", "http.cookiejar", "http.cookies", "http.server",
    "imaplib", "ipaddress", "lzma", "mailbox", "mimetypes", "netrc", "ntpath", "os",
    "pathlib", "platform", "plistlib", "poplib", "posixpath", "queue", "quopri",
    "random", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "ssl", "statistics", "tarfile", "tempfile", "textwrap",
    "urllib.parse", "urllib.request", "urllib.robotparser", "uuid", "wave",
    "webbrowser", "wsgiref.handlers", "wsgiref.headers", "wsgiref.util",
    "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax.handler", "xml.sax.saxutils",
    "xmlrpc.client", "xmlrpc.server", "zipfile", "zoneinfo",
)


def _top(name: str) -> str:
    return name.split(".")[0]


# Disjoint by module and by package (no "email" on one side and "email.utils" on the other),
# and no private twins like _pyio / io, whose docstrings are copies of each other.
assert not {_top(m) for m in PRETRAIN_MODULES} & {_top(m) for m in TASK_MODULES}, \
    "PRETRAIN_MODULES and TASK_MODULES share a package"
assert not any(part.startswith("_") for m in PRETRAIN_MODULES + TASK_MODULES for part in m.split("."))
assert len(set(PRETRAIN_MODULES)) == len(PRETRAIN_MODULES) and len(set(TASK_MODULES)) == len(TASK_MODULES)


def import_module(name: str, allowed: tuple[str, ...]):
    """Import `name`, refusing any module outside `allowed` (so a script cannot read the
    other script's modules by mistake)."""
    if name not in allowed:
        raise ValueError(f"{name} is not in the allowed module list")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. DeprecationWarning on import
        return importlib.import_module(name)


def signature(obj) -> str | None:
    """'(text, width, **kwargs)', or None where inspect cannot tell (many C builtins).

    Default values whose repr holds a memory address ('<object object at 0x7f..>') would
    change from run to run, so the address is dropped.
    """
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return None
    return re.sub(r" at 0x[0-9a-fA-F]+", "", sig)


def documented_objects(module) -> list[tuple[str, str, object]]:
    """(kind, qualified name, object) for the module's public functions and classes and the
    public methods of those classes (Python or C), in sorted-name order; only objects
    defined in the module (re-exports are someone else's) and only those with their own
    docstring."""
    out = []
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        qual = f"{module.__name__}.{name}"
        if inspect.isclass(obj):
            if obj.__doc__:
                out.append(("class", qual, obj))
            for mname in sorted(vars(obj)):
                m = vars(obj)[mname]
                if isinstance(m, (staticmethod, classmethod)):
                    m = m.__func__
                if not mname.startswith("_") and inspect.isroutine(m) and m.__doc__:
                    out.append(("def", f"{qual}.{mname}", m))
        elif inspect.isroutine(obj) and obj.__doc__:
            out.append(("def", qual, obj))
    return out


def clean_docstring(obj) -> str:
    """The object's own docstring, dedented (inspect.cleandoc), with trailing spaces removed."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    return "\n".join(line.rstrip() for line in doc.splitlines()).strip()


def header(kind: str, qualname: str, obj) -> str:
    """The line a docstring hangs from: 'def textwrap.shorten(text, width, **kwargs):'.

    Pretraining text and task prompts share this format, so the task's prompts look like
    the text minift-tiny has read, about functions it has not.
    """
    sig = signature(obj)
    if kind == "class":
        return f"class {qualname}{sig or ''}:"
    return f"def {qualname}{sig or '(...)'}:"


# ----------------------------------------------------------------------------- the corpus
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Left out of the corpus: other people's packages, GUI code, the codec tables (long hex
# arrays), Python 2 code (lib2to3 and its test data), generated data, and the language
# reference as .py (pydoc_data.topics is read as text instead).
SKIP_DIRS = ("site-packages", "idlelib", "tkinter", "turtledemo", "lib2to3", "encodings",
             "ensurepip", "pydoc_data", "__pycache__", "test/test_tkinter", "test/test_ttk",
             "test/test_idle", "test/test_lib2to3", "test/tkinterdata")
MAX_FILE_BYTES = 400_000   # a few generated test files are larger and mostly data


def task_paths() -> list[Path]:
    """The files a task module is made of: `top.py` or the package `top/`, and its tests
    (`test/test_top*.py`, `test/test_top*/`)."""
    out = []
    for top in sorted({_top(m) for m in TASK_MODULES}):
        out += [STDLIB / f"{top}.py", STDLIB / top]
        out += sorted((STDLIB / "test").glob(f"test_{top}*"))
    return [p for p in out if p.exists()]


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def corpus_files() -> list[Path]:
    """The standard library's .py files that pretraining reads, in sorted order: everything
    under STDLIB but SKIP_DIRS, files over MAX_FILE_BYTES, files that are not UTF-8, and
    every file of a task module (`task_paths`)."""
    skipped = [STDLIB / d for d in SKIP_DIRS] + task_paths()
    files = []
    for path in sorted(STDLIB.rglob("*.py")):
        if _inside(path, skipped) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:   # a few tests hold deliberately mis-encoded source
            continue
        files.append(path)
    return files


def check_disjoint(files: list[Path]) -> None:
    """Assert that no corpus file belongs to a task module: neither its source (found
    through the module's own __file__, so a module living elsewhere is caught too) nor its
    tests."""
    roots = task_paths()
    for name in TASK_MODULES:
        module = import_module(name, TASK_MODULES)
        src = Path(module.__file__).resolve()
        roots.append(src.parent if src.name == "__init__.py" else src)
    leaked = [f for f in files if _inside(f.resolve(), roots)]
    assert not leaked, f"task-module files in the pretraining corpus: {leaked[:5]}"
