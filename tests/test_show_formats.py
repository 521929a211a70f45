"""``cellspec show --format latex|markdown|svg|dot`` for every shipped spec (and the test specs):
well-formed output that names every gate and state, deterministic, drawn without overlaps; and
the same equations inside every generated package."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import compiled_cells, spec_paths

from cellspec.cli import main
from cellspec.present import diagram, latex

ROOT = Path(__file__).resolve().parent.parent
SVG = "{http://www.w3.org/2000/svg}"
PATHS = spec_paths(tests=True)
IDS = [p.name for p in PATHS]


def _cells(path: Path):
    return compiled_cells(str(path))


def _balanced(text: str) -> bool:
    depth = 0
    for ch in re.sub(r"\\[{}]", "", text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _written_names(cc) -> list[str]:
    """Every gate, intermediate and next state as the spec writes it (h')."""
    return [a.key for a in cc.checked.assignments]


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_latex_is_balanced_align_naming_every_gate_and_state(path):
    for cc in _cells(path):
        text = latex.cell_latex(cc)
        assert _balanced(text), text
        assert text.count(r"\begin{align}") == 2 and text.count(r"\end{align}") == 2
        forward = text.split(r"\end{align}")[0]
        rows = [r for r in forward.split(r"\\") if "&=" in r]
        # one row per line of the spec, per matrix formed before the loop and per row value
        formed = [pr for pr in cc.model.prepared if len(pr.shape) == 2]
        row_values = [v for v in cc.model.values if v.size == "row" and not v.spec_key]
        assert len(rows) == len(cc.checked.assignments) + len(formed) + len(row_values)
        for pr in formed:
            assert re.search(r"^\s*" + re.escape(latex.name_latex(pr.key)) + r" &=", forward, re.MULTILINE)
        for key in _written_names(cc):
            shown = latex.name_latex(key[:-1]) + "'" if key.endswith("'") else latex.name_latex(key)
            assert re.search(r"^\s*" + re.escape(shown) + r" &=", forward, re.MULTILINE), (
                key,
                forward,
            )
        backward = text.split(r"\begin{align}")[2]
        for st in cc.checked.states:  # the backward gives every previous state's gradient
            assert re.search(
                r"^\s*\\delta " + re.escape(latex.name_latex(st.name)) + " &=",
                backward,
                re.MULTILINE,
            )
        for v in cc.checked.inputs:  # every input's (its first share is assigned with =)
            assert re.search(
                r"^\s*\\delta " + re.escape(latex.name_latex(v.name)) + " &=",
                backward,
                re.MULTILINE,
            )
        # and every trained param: those the math reads, those inside a matrix formed before the
        # loop (their share of its gradient), scalar params (shown as themselves)
        for p in cc.checked.params:
            assert r"\delta " + latex.name_latex(p.name) + r" &\mathrel{+}=" in backward, p.name


def test_latex_of_the_gru_is_the_textbook_form():
    """An independent reference: the GRU's forward written out by hand."""
    (cc,) = _cells(ROOT / "specs" / "gru.cell")
    expected = [
        r"r &= \sigma\left(U_{r} h + W_{r} x + b_{r}\right) \\",
        r"u &= \sigma\left(U_{u} h + W_{u} x + b_{u}\right) \\",
        r"c &= \tanh\left(U_{c} \left(h \odot r\right) + W_{c} x + b_{c}\right) \\",
        r"h' &= c \odot \left(1 - u\right) + h \odot u",
    ]
    assert [line.strip() for line in latex.forward_latex(cc).splitlines()[1:-1]] == expected
    back = latex.backward_latex(cc)
    assert r"\delta h' &= \delta_{t+1} h + \delta_{y} h'" in back
    assert r"\delta c &= \delta h' \odot \left(1 - u\right)" in back  # d/dc of h'
    assert (
        r"\delta U_{c} &\mathrel{+}= \delta \left(U_{c} \left(h \odot r\right)\right) \left(h \odot r\right)^{\top}"
        in back
    )


def test_an_input_gets_its_share_from_every_path():
    """x * y feeds a GEMM and y also feeds its own: dy has both shares, dx only one."""
    from cellspec.driver import compile_source
    from cellspec.errors import Source

    text = (
        "cell TwoIn {\n  input x[I], y[I]\n  state h[H]\n  param W[H, I], V[H, I], U[H, H]\n"
        "  z = W @ (x * y) + V @ y\n  h' = tanh(z + U @ h)\n  output h', z\n}\n"
    )
    (cc,) = compile_source(Source("two.cell", text), ())
    back = latex.backward_latex(cc)
    assert r"\delta x &= \delta \left(x \odot y\right) \odot y" in back
    assert r"\delta y &= \delta \left(x \odot y\right) \odot x" in back
    assert r"\delta y &\mathrel{+}= V^{\top} \delta \left(V y\right)" in back
    assert r"\delta z &= \delta \left(U h\right) + \delta_{y} z" in back  # z is an output too


def test_name_latex():
    assert latex.name_latex("W_hi") == "W_{hi}"
    assert latex.name_latex("mu") == r"\mu"
    assert latex.name_latex("cand") == r"\mathit{cand}"
    assert latex.name_latex("t1_2") == "t_{1,2}"


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_markdown_wraps_the_latex_in_display_blocks(path):
    for cc in _cells(path):
        md = latex.cell_markdown(cc)
        blocks = re.findall(r"^\$\$\n(.*?)\n\$\$$", md, re.MULTILINE | re.DOTALL)
        assert blocks == [latex.forward_latex(cc), latex.backward_latex(cc)]
        assert md.startswith(f"### {cc.checked.name}\n")


def _boxes(root):
    out = []
    for g in root.iter(SVG + "g"):
        if "node" in g.get("class", "").split():
            r = g.find(SVG + "rect")
            texts = [t.text for t in g.iter(SVG + "text")]
            out.append(
                (
                    g.get("class").split()[1],
                    texts,
                    *(float(r.get(k)) for k in ("x", "y", "width", "height")),
                )
            )
    return out


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_svg_parses_names_every_state_and_gate_and_boxes_do_not_overlap(path):
    for cc in _cells(path):
        svg = diagram.to_svg(cc)
        root = ET.fromstring(svg.encode())
        assert root.tag == SVG + "svg"
        W, H = float(root.get("width")), float(root.get("height"))
        boxes = _boxes(root)
        labels = " | ".join(t for _, texts, *_ in boxes for t in texts)
        for st in cc.checked.states:
            assert f"{st.name}  (t-1)" in labels
        for key in _written_names(cc):
            assert any(t.startswith(f"{key} = ") for _, texts, *_ in boxes for t in texts), (
                key,
                labels,
            )
        kinds = [k for k, *_ in boxes]
        assert kinds.count("next") == len(cc.checked.states)
        assert kinds.count("output") == len(cc.checked.outputs)
        assert kinds.count("gemm") == len(cc.schedule.hoisted_gemms) + sum(
            len(s.gemms) for s in cc.schedule.stages
        )
        for _, _, x, y, w, h in boxes:
            assert 0 <= x and x + w <= W and 0 <= y and y + h <= H
        for i, (_, ta, xa, ya, wa, ha) in enumerate(boxes):
            for _, tb, xb, yb, wb, hb in boxes[i + 1 :]:
                apart = xa + wa <= xb or xb + wb <= xa or ya + ha <= yb or yb + hb <= ya
                assert apart, (ta, tb)
        # stages are visible: one band per stage, titled
        bands = [
            t.text
            for g in root.iter(SVG + "g")
            if g.get("class") == "band"
            for t in g.iter(SVG + "text")
        ]
        assert [b for b in bands if b.startswith("stage")] == [
            f"stage {s.index}" for s in cc.schedule.stages
        ]


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_dot_is_a_digraph_with_every_node_and_edge(path):
    for cc in _cells(path):
        dot = diagram.to_dot(cc)
        g = diagram.build_graph(cc)
        assert dot.startswith("digraph ") and dot.rstrip().endswith("}") and _balanced(dot)
        assert dot.count(" -> ") == len(g.edges)
        for n in g.nodes:
            assert f'"{n.id}" [label=' in dot
        assert dot.count("subgraph cluster_") == len(g.bands)


def test_svg_and_latex_are_deterministic_across_hash_seeds(tmp_path):
    outs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        svg, tex = tmp_path / f"{seed}.svg", tmp_path / f"{seed}.tex"
        code = (
            "import sys; from cellspec.cli import main; "
            f"main(['show', 'tests/specs/four_states.cell', '--format', 'svg', '-o', {str(svg)!r}]); "
            f"main(['show', 'tests/specs/four_states.cell', '--format', 'latex', '-o', {str(tex)!r}])"
        )
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)
        outs.append((svg.read_bytes(), tex.read_bytes()))
    assert outs[0] == outs[1]


# ------------------------------------------------------------------------------------- the CLI
def test_cli_writes_svg_to_a_file_and_text_formats_to_stdout(tmp_path, capsys):
    out = tmp_path / "gru.svg"
    assert main(["show", "specs/gru.cell", "--format", "svg", "-o", str(out)]) == 0
    assert ET.fromstring(out.read_bytes()).tag == SVG + "svg"
    assert capsys.readouterr().out == ""
    assert main(["show", "specs/gru.cell", "--format", "latex"]) == 0
    (cc,) = _cells(ROOT / "specs" / "gru.cell")
    assert capsys.readouterr().out == latex.cell_latex(cc) + "\n"
    assert main(["show", "specs/gru.cell", "--format", "svg"]) == 0  # no -o: stdout
    assert capsys.readouterr().out.startswith("<?xml")


def test_cli_show_errors(tmp_path, capsys):
    two = tmp_path / "two.cell"
    tiny = "cell A {\n  input x[I]\n  state h[H]\n  param W[H, I]\n  h' = tanh(W @ x + h)\n}\n"
    two.write_text(tiny + tiny.replace("cell A", "cell B"))
    target = tmp_path / "out.svg"
    assert main(["show", str(two), "--format", "svg", "-o", str(target)]) == 1
    err = capsys.readouterr().err
    assert "2 cells" in err and "A, B" in err and "--cell" in err and not target.exists()
    assert main(["show", str(two), "--format", "svg", "--cell", "B", "-o", str(target)]) == 0
    assert "B  one step" in "".join(ET.fromstring(target.read_bytes()).itertext())
    bad = tmp_path / "bad.cell"
    bad.write_text(tiny.replace("W @ x", "W @ q"))
    assert main(["show", str(bad), "--format", "latex"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"{bad}:5:17: unknown name 'q'" and "Traceback" not in err
    assert main(["show", "specs/gru.cell", "--format", "latex", "--stage", "model"]) == 2


def test_cli_svg_in_a_subprocess_exit_status(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellspec",
            "show",
            "nope.cell",
            "--format",
            "svg",
            "-o",
            str(tmp_path / "x.svg"),
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (
        r.returncode == 1
        and r.stderr.startswith("nope.cell: cannot read")
        and "Traceback" not in r.stderr
    )


# --------------------------------------------------------------------- the generated packages
@pytest.mark.parametrize("path", sorted((ROOT / "specs").glob("*.cell")), ids=lambda p: p.name)
def test_generated_package_carries_its_equations_and_spec(path):
    (cc,) = _cells(path)
    pkg = importlib.import_module(f"generated.{cc.module_name}")
    # the committed package says what show says of the spec (generated/ is kept fresh by test_cli)
    assert (
        pkg.EQUATIONS_LATEX == latex.cell_latex(cc).replace(cc.checked.filename, path.name) + "\n"
    )
    assert pkg.equations()._repr_latex_() == pkg.EQUATIONS_LATEX == str(pkg.equations())
    assert latex.cell_source(cc.checked) in path.read_text()
    assert f"    cell {cc.checked.name} {{" in pkg.__doc__
    for a in cc.checked.assignments:
        assert a.text.strip() in pkg.__doc__


@pytest.mark.parametrize("name", ["gru", "peephole_lstm"])
def test_committed_figures_are_what_show_draws(name):
    """docs/figures/*.svg (in the README and the tutorial) are fresh output of show --format svg."""
    (cc,) = _cells(ROOT / "specs" / f"{name}.cell")
    assert (ROOT / "docs" / "figures" / f"{name}.svg").read_text() == diagram.to_svg(cc)
