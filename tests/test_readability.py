"""The readability rules of our style guide (style.md), checked on every model file and tool.

Each rule is one test, run over each file, and names in its message every offending line
with its text, so that one run lists the whole job. Each checker is a small function of a
file's text, and test_checker_tells_a_break_from_a_keep feeds it a snippet that breaks its
rule and one that keeps it, so that no checker can pass everything.

A file that grows past its character budget (rule 6) or its diff budget (rule 7) for a good
reason raises its number in CHAR_BUDGETS or DIFF_BUDGETS, in the same commit.
"""

import ast
import io
import shutil
import subprocess
import tokenize

import pytest
from conftest import ROOT

# Rule 6: non-blank characters without indentation, per file (later files when present).
# The readability issue's budgets, plus what each later issue allows a file that gains its
# feature: gpt2.py 2K, the LLaMA family 4.5K (the tokenizer issue's prompts and Llama 3's
# RoPE, and `export`), gpt1.py nothing (no --init-from, no export). bpe.py: the tokenizer
# issue's 34.5K. The practical-failures issue named no allowance, so what it added counts.
CHAR_BUDGETS = {
    "gpt1.py": 31_000,
    "gpt2.py": 44_000,
    "llama.py": 51_000,
    "mistral.py": 53_500,
    "mixtral.py": 59_500,
    "gemma.py": 52_000,
    "bpe.py": 34_500,
    "qwen3.py": 56_000,
    "gemma3.py": 60_000,
    "deepseek.py": 68_000,
    "gpt_oss.py": 66_000,
    "hf_to_gguf.py": 13_000,
    "playground.py": 20_000,
    "playground.html": 25_000,
}
# Rule 7: lines changed (removed plus added) from a file to its sibling.
DIFF_BUDGETS = {
    ("gpt1.py", "gpt2.py"): 420,
    ("gpt2.py", "llama.py"): 500,
    ("llama.py", "mistral.py"): 250,
    ("mistral.py", "mixtral.py"): 300,
    ("llama.py", "gemma.py"): 300,
    ("llama.py", "qwen3.py"): 200,
    ("gemma.py", "gemma3.py"): 350,
    ("mixtral.py", "gpt_oss.py"): 400,
    ("mixtral.py", "deepseek.py"): 500,
}
MODEL_FILES = [
    "gpt1.py",
    "gpt2.py",
    "llama.py",
    "mistral.py",
    "mixtral.py",
    "gemma.py",
    "deepseek.py",
    "gpt_oss.py",
    "gemma3.py",
    "qwen3.py",
]
TOOLS = ["bpe.py", "data/download.py", "hf_to_gguf.py", "playground.py"]
FILES = [name for name in MODEL_FILES + TOOLS if (ROOT / name).exists()]
# The playground's page: rule 1's columns and rule 6's budget, the rules that are not Python's.
PAGES = [name for name in ["playground.html"] if (ROOT / name).exists()]
BUDGETED = [name for name in CHAR_BUDGETS if (ROOT / name).exists()]
PAIRS = [pair for pair in DIFF_BUDGETS if all((ROOT / name).exists() for name in pair)]

# The files that break a rule today, while the readability issue is still open. Each entry
# goes when its file is mended; the marks are strict, so a mended file fails until it goes.
NOT_YET = {
    # hf_to_gguf.py: the DeepSeek-V3 issue's deepseek2 (MLA's keys and tensors, about 3.5K)
    # named no allowance beside the export issue's 13K; its filer is asked to size one.
    "rule6": {"gpt1.py", "bpe.py", "hf_to_gguf.py"},
    # mixtral.py -> deepseek.py: MLA and DeepSeekMoE replace Mixtral's attention, window and
    # router: about 720 changed lines against 500 (see the note).
    # mixtral.py -> gpt_oss.py: sinks, alternating layers and their cache, clamped experts with
    # biases, head_size, YaRN and MXFP4: about 520 changed lines against 400.
    "rule7": {("mixtral.py", "deepseek.py"), ("mixtral.py", "gpt_oss.py")},
}


def marked(names, rule):
    """names as pytest parameters, those in NOT_YET[rule] expected to fail."""
    not_yet = pytest.mark.xfail(strict=True, reason=f"{rule} not met yet (readability issue)")
    return [pytest.param(n, marks=not_yet) if n in NOT_YET.get(rule, ()) else n for n in names]


MAX_COLUMNS = 100
SOFT_COLUMNS = 88
MAX_SOFT_SHARE = 0.15  # of non-blank lines, over SOFT_COLUMNS
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 7
MAX_TUPLE = 3
MAX_INLINE_COMMENT = 60


def lines_of(text):
    """The text's lines as diff and an editor count them (str.splitlines also splits at \\f)."""
    return text.removesuffix("\n").split("\n")


def tokens_of(text):
    return list(tokenize.generate_tokens(io.StringIO(text).readline))


# Rule 1: lines of at most 100 columns, and at most 15% of non-blank lines over 88.


def long_lines(text, columns=MAX_COLUMNS):
    return [(n, f"{len(line)} columns") for n, line in enumerate(lines_of(text), 1)
            if len(line) > columns]


def soft_long_share(text):
    """(share of non-blank lines over 88 columns, the number of non-blank lines)."""
    non_blank = [line for line in lines_of(text) if line.strip()]
    over = [line for line in non_blank if len(line) > SOFT_COLUMNS]
    return len(over) / max(1, len(non_blank)), len(non_blank)


# Rule 2: one statement per line.


def semicolons(text):
    return [(tok.start[0], "`;` joins statements") for tok in tokens_of(text)
            if tok.type == tokenize.OP and tok.string == ";"]


def backslash_continuations(text):
    """Lines ending in a backslash outside strings: the one line break that makes no token,
    so the next token starts on a later line than the previous one ended, without NL or
    NEWLINE between them (a comment is followed by one of those)."""
    found = []
    toks = [tok for tok in tokens_of(text) if tok.type != tokenize.ENCODING]
    breaks = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT}
    for prev, tok in zip(toks, toks[1:]):
        if prev.type not in breaks and tok.type != tokenize.ENDMARKER:
            found += [(n, "backslash continuation") for n in range(prev.end[0], tok.start[0])]
    return found


def tangled_conditionals(text):
    """Conditional expressions (a if c else b) that hold another one or span lines."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.IfExp):
            continue
        if any(isinstance(inner, ast.IfExp) for inner in ast.walk(node) if inner is not node):
            found.append((node.lineno, "a conditional expression inside another"))
        if node.end_lineno > node.lineno:
            found.append((node.lineno, f"a conditional expression over lines "
                                       f"{node.lineno}-{node.end_lineno}"))
    return found


# Rule 3: no unrelated values packed into one assignment.


def root_name(node):
    """The name a subscript, attribute or call chain starts from: `q` for q.float(),
    `window` for window[:, 1:]; None for anything else (a number, a sum, a literal)."""
    while isinstance(node, (ast.Subscript, ast.Attribute, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def packed_assignments(text):
    """Assignments of a tuple literal to a tuple of targets that hold unrelated values.

    Unpacking one value (`B, T, C = x.size()`, `a, *rest = f()`) is always one idea. A tuple
    literal of at most 3 values is allowed in two cases. Its values are rooted at the
    target names: a swap or rotation (`a, b = b, a`) or each target made anew from itself
    (`q, k = q.float(), k.float()`). Or its values are "the same thing": names, subscripts,
    attributes or calls rooted at one name (`x, y = window[:, :-1], window[:, 1:]`,
    `step, past = ckpt["step"], ckpt.get("elapsed", 0.0)`). Anything else packs unrelated
    values: `start, ids = time.time(), array("H")`, `n, id = n + 1, token.item()` (a sum
    has no root). The root is a heuristic: it lets `len(a), len(b)` through, as one step
    applied twice, and would let `torch.zeros(1), torch.ones(2)` through too.
    """
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Assign) or not isinstance(node.value, (ast.Tuple, ast.List)):
            continue
        targets = [t for t in node.targets if isinstance(t, (ast.Tuple, ast.List))]
        if not targets:
            continue
        values = node.value.elts
        if len(values) > MAX_TUPLE:
            found.append((node.lineno, f"{len(values)} values in one assignment"))
            continue
        roots = [root_name(value) for value in values]
        from_targets = sorted(map(str, roots)) == sorted(map(ast.unparse, targets[0].elts))
        one_root = len(set(roots)) == 1 and roots[0] is not None
        if not (from_targets or one_root):
            found.append((node.lineno, "unrelated values in one assignment"))
    return found


# Rule 4: functions that fit a screen.


def long_functions(text):
    """Functions and methods (nested ones too) over 60 lines, decorators and docstring
    included, or with more than 7 parameters besides self/cls (*args, **kwargs one each)."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        n_lines = node.end_lineno - start + 1
        if n_lines > MAX_FUNCTION_LINES:
            found.append((node.lineno, f"{node.name}: {n_lines} lines"))
        args = node.args
        params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        params = params[1:] if params[:1] in (["self"], ["cls"]) else params
        n_params = len(params) + (args.vararg is not None) + (args.kwarg is not None)
        if n_params > MAX_PARAMETERS:
            found.append((node.lineno, f"{node.name}: {n_params} parameters"))
    return found


# Rule 5: inline comments are short, or shapes; none on a def or class line.


def header_lines(tree):
    """Lines of each def and class statement before its body."""
    headers = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            headers.update(range(node.lineno, max(node.lineno, node.body[0].lineno - 1) + 1))
    return headers


def bad_inline_comments(text):
    found = []
    headers = header_lines(ast.parse(text))
    code_lines = set()
    for tok in tokens_of(text):
        if tok.type == tokenize.COMMENT and tok.start[0] in code_lines:
            words = tok.string[1:].strip()
            if tok.start[0] in headers:
                found.append((tok.start[0], "a comment on a def or class line"))
            elif len(words) > MAX_INLINE_COMMENT and not tok.string.startswith("# ("):
                found.append((tok.start[0], f"an inline comment of {len(words)} characters"))
        elif tok.type not in {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return found


# Rule 6: character budgets. Rule 7: diff budgets between siblings.


def char_count(text):
    """Non-blank characters without indentation: wrapping a line costs nothing."""
    return sum(len(line.strip()) for line in lines_of(text))


def changed_lines(a, b):
    """The fewest lines removed plus added to turn list a into list b, by Myers' O(ND)
    algorithm: what `diff --minimal a b | grep -c '^[<>]'` counts. Plain `diff` takes
    shortcuts on long files and may count a few more (357 for 355 on gpt2 -> llama)."""
    furthest = {1: 0}  # diagonal k = x - y: the furthest x on it so far
    for d in range(len(a) + len(b) + 1):
        for k in range(-d, d + 1, 2):
            if k == -d or (k != d and furthest[k - 1] < furthest[k + 1]):
                x = furthest[k + 1]  # a line of b added
            else:
                x = furthest[k - 1] + 1  # a line of a removed
            y = x - k
            while x < len(a) and y < len(b) and a[x] == b[y]:
                x += 1
                y += 1
            furthest[k] = x
            if x >= len(a) and y >= len(b):
                return d


def report(name, rule, found):
    """The failure message: the rule, the file, then every offending line with its text."""
    text = lines_of((ROOT / name).read_text(encoding="utf-8"))
    rows = [f"  {n}: {note}: {text[n - 1].strip()}" for n, note in sorted(set(found))]
    return "\n".join([f"{name}: {rule}: {len(rows)} offending line(s)", *rows])


def source(name):
    return (ROOT / name).read_text(encoding="utf-8")


def refuse(name, rule, found):
    """Fail with report()'s message, without pytest's repr of the list beneath it."""
    if found:
        pytest.fail(report(name, rule, found), pytrace=False)


@pytest.mark.parametrize("name", marked(FILES + PAGES, "rule1_100"))
def test_rule1_lines_of_at_most_100_columns(name):
    found = long_lines(source(name))
    refuse(name, "rule 1, lines of at most 100 columns", found)


@pytest.mark.parametrize("name", marked(FILES + PAGES, "rule1_88"))
def test_rule1_few_lines_over_88_columns(name):
    share, n_lines = soft_long_share(source(name))
    over = long_lines(source(name), SOFT_COLUMNS)
    excess = len(over) - int(MAX_SOFT_SHARE * n_lines)
    rule = (f"rule 1, at most 15% of lines over 88 columns: {share:.0%} of {n_lines}, "
            f"shorten {excess} of these")
    refuse(name, rule, over if share > MAX_SOFT_SHARE else [])


@pytest.mark.parametrize("name", marked(FILES, "rule2"))
def test_rule2_one_statement_per_line(name):
    text = source(name)
    found = semicolons(text) + backslash_continuations(text) + tangled_conditionals(text)
    refuse(name, "rule 2, one statement per line", found)


@pytest.mark.parametrize("name", marked(FILES, "rule3"))
def test_rule3_no_unrelated_values_in_one_assignment(name):
    found = packed_assignments(source(name))
    refuse(name, "rule 3, one idea per assignment", found)


@pytest.mark.parametrize("name", FILES)
def test_rule4_functions_fit_a_screen(name):
    found = long_functions(source(name))
    rule = f"rule 4, functions of at most {MAX_FUNCTION_LINES} lines, {MAX_PARAMETERS} parameters"
    refuse(name, rule, found)


@pytest.mark.parametrize("name", marked(FILES, "rule5"))
def test_rule5_inline_comments_are_short(name):
    found = bad_inline_comments(source(name))
    rule = f"rule 5, inline comments of at most {MAX_INLINE_COMMENT} characters or `# (shape`"
    refuse(name, rule, found)


@pytest.mark.parametrize("name", marked(BUDGETED, "rule6"))
def test_rule6_character_budget(name):
    n_chars = char_count(source(name))
    assert n_chars <= CHAR_BUDGETS[name], (
        f"{name}: rule 6, character budget: {n_chars:,} characters, "
        f"{n_chars - CHAR_BUDGETS[name]:,} over its {CHAR_BUDGETS[name]:,}")


@pytest.mark.parametrize("pair", marked(PAIRS, "rule7"), ids="->".join)
def test_rule7_diff_budget(pair):
    n_changed = changed_lines(*(lines_of(source(name)) for name in pair))
    assert n_changed <= DIFF_BUDGETS[pair], (
        f"{pair[0]} -> {pair[1]}: rule 7, diff budget: {n_changed} changed lines, "
        f"{n_changed - DIFF_BUDGETS[pair]} over its {DIFF_BUDGETS[pair]}")


# Each checker against a snippet that breaks its rule and one that keeps it.
BAD_AND_GOOD = {
    long_lines: ("x = 1" + " " * 100 + "\n", "x = 1\n"),
    semicolons: ("x = 1; y = 2\n", "x = ';'  # a ; here\ny = 2\n"),
    backslash_continuations: (
        "total = 1 + \\\n    2\n",
        "total = (1 +\n         2)\ntext = '''a \\\nb'''\n# a \\\nx = 1\n",
    ),
    tangled_conditionals: (
        "x = a if b else c if d else e\ny = (a if b\n     else c)\n",
        "x = a if b else c\n",
    ),
    packed_assignments: (
        "start, ids = time.time(), array('H')\nn, i = n + 1, t.item()\n"
        "a, b, c, d = w[0], w[1], w[2], w[3]\n",
        "B, T, C = x.size()\na, *rest = f()\nx, y = w[:, :-1], w[:, 1:]\na, b, c = c, a, b\n"
        "q, k = q.float(), k.float()\n"
        "step, past = ckpt['step'], ckpt.get('elapsed', 0.0)\n",
    ),
    long_functions: (
        "def f(a, b, c, d, e, f, g, *args):\n    pass\n"
        "class A:\n    @property\n    def g(self):\n" + "        x = 1\n" * 59,
        "class A:\n    @property\n    def g(self, a, b, c, d, e, f, g):\n" + "        x = 1\n" * 58,
    ),
    bad_inline_comments: (
        "x = 1  # " + "words " * 11 + "\ndef f(x):  # what f does\n    pass\n",
        "x = 1  # a few words\ny = z  # (B, T, C): " + "words " * 11 + "\n"
        "# " + "an own-line comment " * 5 + "\ndef f(x):\n    # how\n    pass\n",
    ),
}


@pytest.mark.parametrize("checker", BAD_AND_GOOD, ids=lambda checker: checker.__name__)
def test_checker_tells_a_break_from_a_keep(checker):
    bad, good = BAD_AND_GOOD[checker]
    assert checker(bad), f"{checker.__name__} passed a snippet that breaks its rule"
    assert not checker(good), f"{checker.__name__} refused a snippet that keeps its rule"


def test_checkers_count_what_their_rules_say():
    assert [n for n, _ in packed_assignments(BAD_AND_GOOD[packed_assignments][0])] == [1, 2, 3]
    assert len(tangled_conditionals(BAD_AND_GOOD[tangled_conditionals][0])) == 2
    assert [n for n, _ in long_functions(BAD_AND_GOOD[long_functions][0])] == [1, 5]
    assert soft_long_share("x\n\n" + "y" * 89 + "\n") == (0.5, 2)
    assert char_count("    a b\n\n  c  \n") == 4
    assert changed_lines(list("abcabba"), list("cbabac")) == 5  # Myers' paper's example
    assert changed_lines([], list("ab")) == 2 and changed_lines(list("ab"), list("ab")) == 0


@pytest.mark.skipif(not shutil.which("diff"), reason="no diff command")
@pytest.mark.parametrize("pair", PAIRS, ids="->".join)
def test_changed_lines_counts_as_diff_minimal(pair):
    paths = [str(ROOT / name) for name in pair]
    diff = subprocess.run(["diff", "--minimal", *paths], capture_output=True, text=True)
    expected = sum(line.startswith(("<", ">")) for line in diff.stdout.split("\n"))
    assert changed_lines(*(lines_of(source(name)) for name in pair)) == expected
