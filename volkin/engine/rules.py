"""The source's copy-before-write rules as data: one row per branch of Figs 3-10.

Each row names the figure, the operation, the condition that selects the
branch (in the source's bits) and the plan volkin produces for it, written
with volume names for memories (`V2~spill` is V2's spill memory). The planner
does not read this table: it derives every plan from three general rules
(`planner`). The table is what `docs/map-engine.md` shows and what
`tests/engine/test_figures.py` walks row by row against the planner, so the
general rules are proven to reproduce every figure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    id: str
    figure: str
    operation: str
    condition: str
    plan: str  # steps separated by "; ", as `Plan` prints them with volume names
    note: str = ""


RULES: tuple[Rule, ...] = (
    Rule("fig4-cow", "4", "write V, block n (S a snapshot of V)", "V[S][n] = 0",
         "copy V -> S; commit M[V]=1, V[S]=1; write V"),
    Rule("fig4-done", "4", "write V, block n", "V[S][n] = 1, M[V][n] = 1",
         "write V", "no map change, no commit: the fast path"),
    Rule("fig5-own", "5", "read S, block n", "V[S][n] = 1", "read S"),
    Rule("fig5-through", "5", "read S, block n", "V[S][n] = 0", "read V"),
    Rule("fig6-cow", "6", "write S, block n (part of it)", "V[S][n] = 0",
         "copy V -> S; commit M[S]=1, V[S]=1; write S"),
    Rule("fig6-whole", "6", "write S, all of block n", "V[S][n] = 0",
         "commit M[S]=1; write S (durable); commit V[S]=1",
         "a whole-block write needs no copy; V is set only once the data is durable"),
    Rule("fig7-push", "7", "background step, block n of V2", "R[n] = 1, M[V2][n] = 1",
         "copy V2 -> S2; commit V[S2]=1, ghost V2=0; copy V1 -> V2; commit V[V2]=1",
         "the push to S2 is committed before V2's block is overwritten"),
    Rule("fig7-plain", "7", "background step, block n of V2", "R[n] = 1, M[V2][n] = 0",
         "copy V1 -> V2; commit ghost V2=0, V[V2]=1"),
    Rule("fig8", "8", "write V1 during the refresh", "V[V2][n] = 0, M[V2][n] = 1",
         "copy V2 -> S2; commit M[V1]=1, V[S2]=1, ghost V2=0; copy V1 -> V2; "
         "commit V[V2]=1; write V1",
         "V2 gets V1's block before it changes: the background step for n first"),
    Rule("fig9", "9", "write V2 (part of block n) during the refresh",
         "V[V2][n] = 0, M[V2][n] = 1",
         "copy V2 -> S2; commit M[V2]=1, V[S2]=1, ghost V2=0; copy V1 -> V2; "
         "commit V[V2]=1; write V2",
         "steps 126 and 130 in the order that preserves S2 (see the Fig 9 section)"),
    Rule("fig9-whole", "9", "write V2 (all of block n) during the refresh",
         "V[V2][n] = 0, M[V2][n] = 1",
         "copy V2 -> S2; commit M[V2]=1, V[S2]=1, ghost V2=0; write V2 (durable); "
         "commit V[V2]=1",
         "no copy from V1: the write replaces the whole block"),
    Rule("fig10-old", "10", "write S2 (part of block n) during the refresh",
         "V[S2][n] = 0, M[V2][n] = 1", "copy V2 -> S2; commit M[S2]=1, V[S2]=1; write S2",
         "S2 takes V2's old block, still in V2's memory"),
    Rule("fig10-refreshed", "10", "write S2 (part of block n), S2 taken during the refresh",
         "V[S2][n] = 0, V[V2][n] = 1", "copy V2 -> S2; commit M[S2]=1, V[S2]=1; write S2"),
    Rule("fig10-source", "10", "write S2 (part of block n), S2 taken during the refresh",
         "V[S2][n] = 0, V[V2][n] = 0, M[V2][n] = 0",
         "copy V1 -> S2; commit M[S2]=1, V[S2]=1; write S2",
         "S2's contents are V2's, which are still V1's"),
    Rule("read-v2", "-", "read V2 during the refresh", "V[V2][n] = 0", "read V1",
         "recursively, if V1 is itself virtual"),
    Rule("swap", "-", "background step of V0 when V4 reads V0's old block and V0 reads V4's",
         "each memory holds the other's readers' old block",
         "copy V4 -> V4~spill; commit V4~spill=1, ghost V4=0; copy V0 -> V4; "
         "commit V[V4]=1, ghost V0=0; copy V4~spill -> V0; commit V[V0]=1",
         "not in the source: a swap needs a third place, the ghost's spill memory"),
)


def render_markdown() -> str:
    """The table as `docs/map-engine.md` shows it."""
    lines = [
        "| rule | fig | operation | condition | plan | note |",
        "|---|---|---|---|---|---|",
    ]
    for rule in RULES:
        lines.append(f"| `{rule.id}` | {rule.figure} | {rule.operation} | {rule.condition} "
                     f"| {rule.plan} | {rule.note} |")
    return "\n".join(lines) + "\n"
