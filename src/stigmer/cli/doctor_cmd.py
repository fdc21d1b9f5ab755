"""`stigmer doctor [--json]`: the report on stdout; the exit code says whether problems were found."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from stigmer.cli.render import Out
from stigmer.errors import ErrorCode
from stigmer.units import human_bytes

if TYPE_CHECKING:
    from stigmer.doctor import Report

RUNS_ON = {
    "gpu": "GPU (all of the model in GPU memory)",
    "partial": "GPU and CPU (part of the model in RAM)",
    "cpu": "CPU",
}


def doctor(args: argparse.Namespace) -> int:
    from stigmer.doctor import diagnose
    from stigmer.paths import Paths

    out = Out()
    if not args.json:
        out.note("Examining this machine and the Stigmer server...")
    report = diagnose(Paths.from_env())
    if args.json:
        out.json(report.to_dict())
    else:
        render(out, report)
    return 0 if report.ok else ErrorCode.DOCTOR_PROBLEMS.exit_code


def render(out: Out, r: Report) -> None:
    hw = r.hardware
    out.line("Stigmer doctor")
    out.line(out.rule)
    out.line("Hardware:")
    out.line(f"  RAM:       {human_bytes(hw.ram_total)} total, {human_bytes(hw.ram_available)} available")
    cpu = hw.cpu
    flags = " ".join(sorted(cpu.flags)) or "none of those llama.cpp uses"
    model = f", {cpu.model}" if cpu.model else ""
    out.line(f"  CPU:       {cpu.physical_cores} cores ({cpu.logical_cores} threads), {cpu.arch}{model}")
    out.line(f"  CPU flags: {flags}")
    if not hw.gpus:
        out.line("  GPU:       none found")
    for g in hw.gpus:
        memory = human_bytes(g.memory_total) if g.memory_total else "memory unknown"
        free = f", {human_bytes(g.memory_free)} free" if g.memory_free is not None else ""
        driver = f", driver {g.driver}" if g.driver else ""
        shared = " (shares the RAM)" if g.unified_memory else ""
        out.line(f"  GPU:       {g.name}: {memory}{free}{driver}{shared}")
    out.line()
    _llm(out, r)
    out.line()
    out.line("Stigmer server:")
    if r.server["running"]:
        out.line(f"  Status:    {out.ok()} Running (PID {r.server['pid']}), phase {r.server['phase']}")
    else:
        out.line(f"  Status:    {out.bad()} Not running")
    for name, state in r.services.items():
        out.line(f"  {name + ':':<10} {state}")
    out.line()
    out.line("Addresses:")
    labels = {"llm": "Local LLM", "api": "API", "temporal": "Temporal", "temporal_ui": "Temporal UI"}
    for key, value in r.addresses.items():
        out.line(f"  {labels.get(key, key) + ':':<13}{value}")
    out.line()
    out.line("Models:")
    out.line(f"  Folder:    {r.models['dir']} ({human_bytes(r.models['free'])} free)")
    out.line(f"  Config:    {r.config['file']}" + ("" if r.config["exists"] else " (not written yet)"))
    if r.isolation:
        out.line()
        _isolation(out, r.isolation)
    if r.notes:
        out.line()
        out.line("Notes:")
        for note in r.notes:
            out.line(f"  {out.marks['info']} {note}")
    out.line()
    if r.ok:
        out.success("No problems found")
        return
    out.line("Problems:")
    for p in r.problems:
        out.line(f"  {out.bad()} {p.message}")
        if p.fix and p.fix not in p.message:
            out.line(f"      fix: {p.fix}")
    out.line()
    out.line(f"{out.bad()} {len(r.problems)} problem{'s' if len(r.problems) != 1 else ''} found")


def _llm(out: Out, r: Report) -> None:
    llm: dict[str, Any] = r.llm
    rt = r.runtime
    out.line("LLM:")
    out.line(f"  Provider:  {r.provider_label} (llm.provider {r.provider})")
    source = {
        "stigmer": f"installed by Stigmer: {rt.get('path', '')}",
        "path": f"on PATH: {rt.get('path', '')}",
        "built-in": "built in (the xllamacpp package)",
        "remote": f"remote endpoint {rt.get('path', '')}",
        "external": "the server answering (neither installed by Stigmer nor on PATH)",
        "none": "not installed yet (downloaded at the first start: stigmer server)",
    }.get(str(rt.get("source")), str(rt.get("source")))
    version = f"{rt['name']} {rt['version']}".strip() if rt.get("version") else str(rt.get("name", ""))
    out.line(f"  Runtime:   {version}, {source}")
    if rt.get("serving") and rt.get("serving") != rt.get("version"):
        out.line(f"             the server answering is version {rt['serving']}")
    if llm["running"]:
        who = (
            f"managed by Stigmer (PID {llm['pid']})"
            if llm["managed"]
            else "external (not started by Stigmer)"
        )
        out.line(f"  Server:    {out.ok()} Running, {who}, {llm['base_url']}")
    else:
        out.line(f"  Server:    {out.bad()} Not running ({llm['base_url']})")
    downloaded = "" if llm["model_available"] or not llm["running"] else " (not downloaded yet)"
    out.line(f"  Model:     {llm['model']}{downloaded}")
    if llm.get("model_reason"):
        out.line(f"             chosen for this machine: {llm['model_reason']}")
    if llm.get("expected_tokens_per_second"):
        from stigmer.hw.speed import shown

        tps = float(llm["expected_tokens_per_second"])
        out.line(f"  Speed:     {shown(tps)} tokens/s expected here (estimated from the hardware)")
    if llm["running"]:
        where = RUNS_ON.get(str(llm.get("runs_on")), "not known (the model is not loaded now)")
        out.line(f"  Runs on:   {where}")
    if llm.get("context"):
        out.line(f"  Context:   {llm['context']} tokens")


LEVELS = {
    "full": "full (files and network confined by the OS)",
    "partial": "partial",
    "none": "none (tools are not confined by the OS)",
}


def _isolation(out: Out, iso: dict[str, Any]) -> None:
    """The sandbox tools run in here (stigmer.sandbox.probe); the fixes repeat in Notes or Problems."""
    level = iso["level"]
    mark = out.ok() if level == "full" else out._mark("warn", "yellow", err=False)
    out.line("Isolation:")
    out.line(f"  Level:     {mark} {LEVELS.get(level, level)}")
    out.line(f"  Sandbox:   {iso['summary']}")
    if iso["platform"] == "linux":
        landlock = f"ABI {iso['landlock']}" if iso["landlock"] else "not available"
        modules = f" (security modules: {','.join(iso['lsm'])})" if iso["lsm"] else ""
        out.line(f"  Landlock:  {landlock}{modules}")
        out.line(f"  Seccomp:   {'yes' if iso['seccomp'] else 'no'}")
        out.line(f"  User ns:   {iso['userns']} (not used by Stigmer)")
    out.line(f"  Required:  tools.require_sandbox {'true' if iso.get('require_sandbox') else 'false'}")
    for note in iso["notes"]:
        out.line(f"  note:      {note}")
    for fix in iso["fixes"]:
        out.line(f"  fix:       {fix}")
