"""The standard-library text behind minift's embedded default: one place for both module lists.

scripts/pretrain_tiny.py pretrains minift-tiny on `pydoc_data.topics` (the language
reference that `help("assert")` prints) and the docstrings of PRETRAIN_MODULES.
scripts/make_dataset.py builds the fine-tuning task from the docstrings of TASK_MODULES.
The two lists are disjoint (asserted below), so the task asks the model about functions
whose documentation it never read during pretraining.

Only modules present in every CPython from 3.10 to 3.13 are listed (nothing deprecated
by PEP 594, no tkinter), and none with import side effects. The built assets are
committed, so these lists only matter when rebuilding them.
"""
from __future__ import annotations

import importlib
import inspect
import re
import warnings

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
