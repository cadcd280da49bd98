#!/usr/bin/env python3
"""Write the seed corpus: the literal stanzas of tests/spec_examples.rs and tests/malformed.rs
(format placeholders filled in with the tests' constants), and nesting bombs at and around the
depth limits (64 default, 256 ceiling) up to 100,000 levels.

Parsers get each text as it is; the sequence targets get it as the first text of the pool
(see src/lib.rs), behind a few control bytes, so that the template and raw-text handlers see it.
"""
import os, random, re, sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, "..", "tests")
CONST = {
    "ROOM": "chatroom@conference.fairfax.tridsys.com",
    "MUC_SERVICE": "conference.fairfax.tridsys.com",
    "MIRROR": "mirror.raleigh.tridsys.com",
    "A_MIRROR": "mirror.raleigh.tridsys.com",
    "B_MIRROR": "mirror.durham.tridsys.com",
    "WAYNE": "wayne@raleigh.tridsys.com/pc",
    "OUTSIDER": "mallory@evil.example/x",
    "FORM": "<x xmlns='jabber:x:data' type='form'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/muc#roomconfig</value></field></x>",
}

def literals(path):
    src = open(path, encoding="utf-8").read()
    # Rust string literals (plain and raw), line continuations joined.
    for m in re.finditer(r'r#"(.*?)"#|"((?:[^"\\]|\\.)*)"', src, re.S):
        s = m.group(1) if m.group(1) is not None else m.group(2)
        if m.group(2) is not None:
            s = re.sub(r"\\\n\s*", "", s).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        if "<" not in s or len(s) < 8:
            continue
        s = re.sub(r"\{(\w+)\}", lambda k: CONST.get(k.group(1), "x"), s)
        s = s.replace("{{", "{").replace("}}", "}")
        yield s

def nest(levels):
    return "<a>" * levels + "</a>" * levels

def main(out):
    texts = []
    for f in ("spec_examples.rs", "malformed.rs", "bounds.rs"):
        texts.extend(literals(os.path.join(TESTS, f)))
    texts = sorted(set(texts))
    deep = {}
    for d in (60, 63, 64, 65, 253, 256, 257, 300, 100_000):
        deep[f"nest{d}"] = nest(d)
        deep[f"presence{d}"] = (f"<presence from='mallory@evil.example/x' to='{CONST['ROOM']}/N'>"
                                f"<x xmlns='http://jabber.org/protocol/muc'/>{nest(d - 1)}</presence>")
        deep[f"message{d}"] = (f"<message from='wayne@raleigh.tridsys.com/pc' to='{CONST['ROOM']}' type='groupchat'>"
                               f"<body>hi</body>{nest(d - 1)}</message>")
    deep["unclosed100000"] = "<a>" * 100_000
    rnd = random.Random(11)
    for target in ("parsers", "master", "mirror", "world"):
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        def put(name, data):
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        for i, t in enumerate(texts):
            b = t.encode()
            if target == "parsers":
                put(f"lit{i:03}", b)
            else:
                ctl = bytes(rnd.randrange(1, 256) for _ in range(rnd.randrange(4, 40)))
                put(f"lit{i:03}", ctl + b"\0" + b)
        for name, t in deep.items():
            b = t.encode()
            if target == "parsers":
                put(name, b)
            else:
                # Deep payloads matter most at depth: a few control prefixes each.
                if len(b) > 100_000 and target != "world":
                    continue
                for k in range(3):
                    ctl = bytes(rnd.randrange(1, 256) for _ in range(rnd.randrange(4, 40)))
                    put(f"{name}-{k}", ctl + b"\0" + b)
    print(f"{len(texts)} literal stanzas, {len(deep)} deep texts")

main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "seeds"))
