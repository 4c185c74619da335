#!/usr/bin/env python3
"""Which 8 KiB pages of a PostgreSQL data directory changed between two moments.

    pagediff.py snapshot PGDATA STATE     record a hash of every page
    pagediff.py diff PGDATA STATE [--pages-out FILE]
                                          compare with the snapshot; print JSON
                                          {"pages", "changed_pages", "changed_bytes",
                                           "new_files", "files"}; with --pages-out,
                                          write the changed pages one after another
                                          (to compress them as a physical limit)

Only relation files count (base/ and global/: tables, indexes, their free
space and visibility maps); WAL, statistics and control files are not data
pages. A page of a new file, or past the old end of a file, is a changed page.
"""
import argparse
import hashlib
import json
import os
import pickle
import re
import sys

PAGE = 8192
# <relfilenode>[_fsm|_vm|_init][.<segment>]
RELATION = re.compile(r"^[0-9]+(_fsm|_vm|_init)?(\.[0-9]+)?$")


def relation_files(pgdata):
    for top in ("base", "global"):
        for dirpath, _, names in os.walk(os.path.join(pgdata, top)):
            for name in names:
                if RELATION.match(name):
                    path = os.path.join(dirpath, name)
                    yield os.path.relpath(path, pgdata), path


def page_hashes(path):
    out = []
    with open(path, "rb") as f:
        while True:
            page = f.read(PAGE)
            if not page:
                break
            out.append(hashlib.blake2b(page, digest_size=12).digest())
    return out


def snapshot(args):
    state = {rel: page_hashes(path) for rel, path in relation_files(args.pgdata)}
    with open(args.state, "wb") as f:
        pickle.dump(state, f)


def diff(args):
    with open(args.state, "rb") as f:
        before = pickle.load(f)
    pages = changed = new_files = files = 0
    sink = open(args.pages_out, "wb") if args.pages_out else None
    for rel, path in relation_files(args.pgdata):
        files += 1
        old = before.get(rel)
        if old is None:
            new_files += 1
            old = []
        with open(path, "rb") as f:
            i = 0
            while True:
                page = f.read(PAGE)
                if not page:
                    break
                pages += 1
                h = hashlib.blake2b(page, digest_size=12).digest()
                if i >= len(old) or old[i] != h:
                    changed += 1
                    if sink:
                        sink.write(page)
                i += 1
    if sink:
        sink.close()
    json.dump({"pages": pages, "changed_pages": changed, "changed_bytes": changed * PAGE,
               "new_files": new_files, "files": files}, sys.stdout)
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snapshot")
    s.add_argument("pgdata")
    s.add_argument("state")
    d = sub.add_parser("diff")
    d.add_argument("pgdata")
    d.add_argument("state")
    d.add_argument("--pages-out")
    args = p.parse_args()
    {"snapshot": snapshot, "diff": diff}[args.cmd](args)


if __name__ == "__main__":
    main()
