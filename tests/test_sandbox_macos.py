"""sandbox.macos: the sandbox-exec profile of a Policy (read by a small SBPL reader here: this is Linux),
hostile path names that must stay inside their string literal, the command line; windows_note."""

from __future__ import annotations

from typing import Union

import pytest

from stigmer.sandbox import macos
from stigmer.sandbox.policy import ANY, NONE, PORTS, Policy

Node = Union[str, "Str", list["Node"]]


class Str(str):
    """A string literal, as opposed to a symbol."""


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def read(text: str) -> list[Node]:
    """The forms of an SBPL profile, as TinyScheme reads them (comments, strings with escapes, #"regex")."""
    forms: list[Node] = []
    stack: list[list[Node]] = [forms]
    i = 0
    while i < len(text):
        c = text[i]
        if c == ";":
            i = text.index("\n", i) if "\n" in text[i:] else len(text)
        elif c.isspace():
            i += 1
        elif c == "(":
            new: list[Node] = []
            stack[-1].append(new)
            stack.append(new)
            i += 1
        elif c == ")":
            stack.pop()
            assert stack, "unbalanced )"
            i += 1
        elif c == '"' or text.startswith('#"', i):
            i += 1 if c == '"' else 2
            out = []
            while text[i] != '"':
                if text[i] == "\\":
                    e = text[i + 1]
                    if e == "x":
                        out.append(chr(int(text[i + 2 : i + 4], 16)))
                        i += 4
                        continue
                    out.append(ESCAPES[e])
                    i += 2
                    continue
                assert text[i] != "\n", "a raw newline inside a string"
                out.append(text[i])
                i += 1
            stack[-1].append(Str("".join(out)))
            i += 1
        else:
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in "()":
                j += 1
            stack[-1].append(text[i:j])
            i = j
    assert len(stack) == 1, "unbalanced ("
    return forms


def rules(profile: str) -> list[list[Node]]:
    forms = read(profile)
    assert forms[:2] == [["version", "1"], ["deny", "default"]]
    assert all(isinstance(f, list) for f in forms)
    return [f for f in forms if isinstance(f, list)]


def allowed(profile: str, op: str) -> list[tuple[str, str]]:
    """(filter, path) of every `(allow ... op ... (filter "path"))`."""
    out = []
    for form in rules(profile):
        if form[0] == "allow" and op in form:
            out += [
                (f[0], f[1])
                for f in form[1:]
                if isinstance(f, list) and len(f) == 2 and isinstance(f[1], Str)
            ]
    return out


def test_the_basics_every_program_needs() -> None:
    text = macos.profile(Policy(name="shell"))
    forms = rules(text)
    assert ["allow", "process-fork"] in forms and ["allow", "process-exec"] in forms
    assert ["allow", "sysctl-read"] in forms
    assert ["allow", "signal", ["target", "same-sandbox"]] in forms
    assert ("literal", "/dev/null") in allowed(text, "file-write*")
    assert ("subpath", "/usr") in allowed(text, "file-read*")
    lookups = next(f for f in forms if f[:2] == ["allow", "mach-lookup"])
    assert ["global-name", "com.apple.system.opendirectoryd.libinfo"] in lookups
    assert not any("network" in str(f[1]) for f in forms if f[0] == "allow")  # network "none": nothing


def test_read_write_and_devices() -> None:
    policy = Policy(
        name="shell",
        read=("/opt/tools", "/Users/me/datasets"),
        write=("/Users/me/.stigmer/workspaces/a1",),
        devices=("/dev/ttys003",),
    )
    text = macos.profile(policy)
    assert ("subpath", "/Users/me/datasets") in allowed(text, "file-read*")
    assert ("subpath", "/Users/me/datasets") not in allowed(text, "file-write*")
    assert ("subpath", "/Users/me/.stigmer/workspaces/a1") in allowed(text, "file-write*")
    assert ("literal", "/dev/ttys003") in allowed(text, "file-ioctl")
    # secrets: denied because never allowed
    everything = [p for op in ("file-read*", "file-write*") for _, p in allowed(text, op)]
    assert not any(p.endswith((".ssh", ".stigmer", "api.token")) for p in everything)


def test_network_none_ports_any_and_bind() -> None:
    ports = macos.profile(Policy(name="http", network=PORTS, connect=(8899, 9000)))
    outbound = [f for f in rules(ports) if f[:2] == ["allow", "network-outbound"]]
    assert outbound == [
        ["allow", "network-outbound", ["remote", "tcp", "localhost:8899"]],
        ["allow", "network-outbound", ["remote", "tcp", "localhost:9000"]],
    ]
    assert ["allow", "network*"] not in rules(ports)
    anything = rules(macos.profile(Policy(name="web", network=ANY)))
    assert ["allow", "network*"] in anything and ["deny", "network-bind"] not in anything
    engine = rules(macos.profile(Policy(name="engine", network=ANY, bind=(11435,))))
    at = engine.index(["allow", "network*"])
    assert engine[at + 1] == ["deny", "network-bind"]  # the last match wins: only its port below
    assert ["allow", "network-bind", "network-inbound", ["local", "tcp", "localhost:11435"]] in engine[at:]
    none = rules(macos.profile(Policy(name="shell", network=NONE, bind=())))
    assert not any(str(f[1]).startswith("network") for f in none if f[0] == "allow")


@pytest.mark.parametrize(
    "name",
    [
        'ws")) (allow file-read* (subpath "/',
        "ws\\",
        'ws\\"))(allow default)(',
        "ws\n(allow default)\n",
        "ws)\r\t;(allow default)",
        "ws\x01\x1b[31m\x7f",
        "wörk 空间 ",
    ],
)
def test_hostile_path_names_stay_one_string(name: str) -> None:
    path = "/Users/me/" + name
    policy = Policy(name='shell"\n(allow default)', read=(path,), write=(path + "/out",))
    text = macos.profile(policy)
    forms = rules(text)
    assert ("subpath", path) in allowed(text, "file-read*")
    assert ("subpath", path + "/out") in allowed(text, "file-write*")
    # nothing was added: the same rules as for a plain name, and never a bare (allow default)
    plain = rules(macos.profile(Policy(name="shell", read=("/a",), write=("/a/out",))))
    assert len(forms) == len(plain) and ["allow", "default"] not in forms
    assert [f[:2] for f in forms] == [f[:2] for f in plain]


def test_quote() -> None:
    assert macos.quote('a"b\\c') == '"a\\"b\\\\c"'
    assert macos.quote("a\nb") == '"a\\nb"'
    assert macos.quote("\x00") == '"\\x00"'


def test_argv() -> None:
    policy = Policy(name="shell", write=("/w",))
    argv = macos.argv(policy, ["sh", "-c", "echo hi"])
    assert argv[:2] == ["/usr/bin/sandbox-exec", "-p"]
    assert argv[2] == macos.profile(policy) and argv[3:] == ["sh", "-c", "echo hi"]


def test_windows_note() -> None:
    note = macos.windows_note()
    assert "environment" in note and "process tree" in note and "NOT confined" in note
