#!/usr/bin/env python3
"""Checks src/'s layering (docs/design.md, "Layout"): each file's uses of
other ekm files (`crate::a::b`), then that no file uses a folder above its
own (sql > jobs > keys > pg), that there is no import circle between files,
and that every file opens with a comment and is at most 700 lines unless its
opening comment says why it is one cohesive thing. Prints one line per
check and 'layers: N passed, M failed'."""
import re, sys, pathlib

root = pathlib.Path(__file__).resolve().parent.parent / 'src'
ORDER = ['pg', 'keys', 'jobs', 'sql']
files = {}
for p in sorted(root.glob('*/*.rs')):
    if p.name == 'mod.rs':
        continue
    files[f'{p.parent.name}::{p.stem}'] = p.read_text()

def uses(text):
    out = set()
    # crate::a::b, and `use crate::a::{b, c::...}` groups
    for m in re.finditer(r'crate::([a-z_]+)::\{([^}]*)\}', text):
        for part in m.group(2).split(','):
            name = part.strip().split('::')[0].split(' ')[0]
            if name and name != 'self':
                out.add(f'{m.group(1)}::{name}')
            elif name == 'self':
                pass
    for m in re.finditer(r'crate::([a-z_]+)::([a-z_]+)', text):
        out.add(f'{m.group(1)}::{m.group(2)}')
    return {u for u in out if u in files}

graph = {f: uses(t) - {f} for f, t in files.items()}
passed = failed = 0
def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
        print(f'ok - {what}')
    else:
        failed += 1
        print(f'not ok - {what}')

for f, deps in sorted(graph.items()):
    layer = ORDER.index(f.split('::')[0])
    up = sorted(d for d in deps if ORDER.index(d.split('::')[0]) > layer)
    check(not up, f'{f} uses no layer above its own' + (f' (uses {", ".join(up)})' if up else ''))

# circles: strongly connected components with more than one file
index = {}; low = {}; stack = []; on = set(); sccs = []; counter = [0]
def strong(v):
    index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
    for w in graph[v]:
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        sccs.append(comp)
sys.setrecursionlimit(10000)
for v in graph:
    if v not in index:
        strong(v)
circles = [sorted(c) for c in sccs if len(c) > 1]
check(not circles, 'no import circle between files of src/' + (f': {circles}' if circles else ''))

# ekm-core: no circle between its modules either
core = {p.stem: p.read_text() for p in sorted((root.parent / 'ekm-core' / 'src').glob('*.rs')) if p.stem != 'lib'}
cgraph = {m: {d for d in re.findall(r'crate::([a-z_]+)', t) if d in core and d != m} for m, t in core.items()}
index.clear(); low.clear(); stack.clear(); on.clear(); sccs.clear(); counter[0] = 0
graph = cgraph
for v in cgraph:
    if v not in index:
        strong(v)
circles = [sorted(c) for c in sccs if len(c) > 1]
check(not circles, 'no import circle between modules of ekm-core' + (f': {circles}' if circles else ''))

for f, t in sorted(files.items()):
    lines = t.count('\n')
    head = t.lstrip().startswith('//!')
    check(head, f'{f} opens with a comment saying what it holds')
    cohesive = 'one cohesive' in t.split('\n\n')[0]
    check(lines <= 700 or cohesive, f'{f}: {lines} lines' + ('' if lines <= 700 else ' (its opening comment says why it is one cohesive thing)' if cohesive else ' (over 700, with no reason given)'))

print(f'layers: {passed} passed, {failed} failed')
sys.exit(1 if failed else 0)
