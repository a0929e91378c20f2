"""Aggregation and rendering of canary results (exporter.canary.results.compare) on constructed results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.canary.model import MB, CanaryResult, Measurement
from exporter.canary.results.compare import aggregate, compare, render_comparison, render_rates


def result(
    profile: str,
    rates: dict[tuple[str, str], list[float]],
    drivers: dict[str, str] | None = None,
    outcome: str = "success",
) -> CanaryResult:
    """A result whose measurements have the given MB/s per (cipher, op), one per round."""
    ms = [
        Measurement(cipher=c, op=op, round=i, bytes=int(rate * MB), seconds=1.0)
        for (c, op), per_round in rates.items()
        for i, rate in enumerate(per_round)
    ]
    return CanaryResult(
        profile=profile,
        result=outcome,
        started_at=100.0,
        finished_at=130.0,
        drivers=drivers or {},
        measurements=ms,
    )


def test_aggregate_mean_min_max_and_driver() -> None:
    res = result(
        "aesni",
        {("aes-xts-plain", "read"): [100.0, 110.0, 120.0], ("aes-xts-plain", "write"): [50.0]},
        drivers={"aes-xts-plain": "xts-aes-aesni"},
    )
    stats = {(s.cipher, s.op): s for s in aggregate([res])}
    read = stats[("aes-xts-plain", "read")]
    assert read.mean == pytest.approx(110 * MB)
    assert read.minimum == pytest.approx(100 * MB)
    assert read.maximum == pytest.approx(120 * MB)
    assert read.rounds == 3
    assert read.driver == "xts-aes-aesni"
    assert stats[("aes-xts-plain", "write")].rounds == 1


def test_aggregate_drops_rounds_without_time_and_merges_results() -> None:
    a = result("p", {("aes-cbc-plain", "read"): [10.0]})
    b = result("p", {("aes-cbc-plain", "read"): [30.0]})
    b.measurements.append(Measurement("aes-cbc-plain", "read", 9, 1000, 0.0))  # no time reported
    (s,) = aggregate([a, b])
    assert s.rounds == 2
    assert s.mean == pytest.approx(20 * MB)


def test_aggregate_keeps_configured_order() -> None:
    res = result("p", {("aes-xts-plain", "read"): [1.0], ("aes-ecb-plain", "read"): [1.0]})
    assert [s.cipher for s in aggregate([res])] == ["aes-xts-plain", "aes-ecb-plain"]


def test_compare_speedup_percent_and_ratio() -> None:
    w = result("aesni", {("aes-xts-plain", "read"): [150.0], ("aes-xts-plain", "write"): [58.0]})
    wo = result("noaesni", {("aes-xts-plain", "read"): [100.0], ("aes-xts-plain", "write"): [50.0]})
    comp = compare([w, wo], "aesni", "noaesni")
    read = comp.row("aes-xts-plain", "read")
    write = comp.row("aes-xts-plain", "write")
    assert read is not None and write is not None
    assert read.ratio == pytest.approx(1.5)
    assert read.speedup_percent == pytest.approx(50.0)
    assert write.speedup_percent == pytest.approx(16.0)
    assert comp.speedup_range("read") == pytest.approx((50.0, 50.0))


def test_compare_missing_side_gives_row_without_speedup() -> None:
    w = result("aesni", {("aes-xts-plain", "read"): [150.0], ("aes-cbc-plain", "read"): [90.0]})
    wo = result("noaesni", {("aes-xts-plain", "read"): [100.0]}, outcome="guest_panic")
    comp = compare(
        [w, wo], "aesni", "noaesni", ciphers=["aes-xts-plain", "aes-cbc-plain", "aes-ctr-plain"], ops=["read"]
    )
    assert [r.cipher for r in comp.rows] == ["aes-xts-plain", "aes-cbc-plain", "aes-ctr-plain"]
    cbc = comp.row("aes-cbc-plain", "read")
    ctr = comp.row("aes-ctr-plain", "read")
    assert cbc is not None and cbc.without_stats is None and cbc.speedup_percent is None
    assert ctr is not None and ctr.with_stats is None and ctr.ratio is None
    assert comp.speedup_range("read") == pytest.approx((50.0, 50.0))
    assert comp.speedup_range("write") is None


def test_summary_like_the_guide() -> None:
    w = result(
        "aesni",
        {
            ("a-ecb-plain", "read"): [140.0],
            ("a-cbc-plain", "read"): [191.0],
            ("a-ecb-plain", "write"): [116.0],
            ("a-cbc-plain", "write"): [150.0],
        },
    )
    wo = result(
        "noaesni",
        {
            ("a-ecb-plain", "read"): [100.0],
            ("a-cbc-plain", "read"): [100.0],
            ("a-ecb-plain", "write"): [100.0],
            ("a-cbc-plain", "write"): [100.0],
        },
    )
    summary = compare([w, wo], "aesni", "noaesni").summary()
    assert summary == "with aesni, reads 40-91% faster, writes 16-50% faster than with noaesni"


def test_summary_reports_slowdown_and_no_data() -> None:
    w = result("aesni", {("c", "read"): [80.0]})
    wo = result("noaesni", {("c", "read"): [100.0]})
    assert "reads 20% slower" in compare([w, wo], "aesni", "noaesni").summary()
    mixed = [
        result("aesni", {("c", "read"): [80.0], ("d", "read"): [300.0]}),
        result("noaesni", {("c", "read"): [100.0], ("d", "read"): [100.0]}),
    ]
    assert "reads 20% slower to 200% faster than" in compare(mixed, "aesni", "noaesni").summary()
    assert "no speedup" in compare([], "aesni", "noaesni", ciphers=["c"]).summary()


def test_render_comparison_table_layout() -> None:
    w = result(
        "aesni",
        {("aes-xts-plain", "read"): [150.0], ("aes-xts-plain", "write"): [60.0]},
        drivers={"aes-xts-plain": "xts-aes-aesni"},
    )
    wo = result(
        "noaesni", {("aes-xts-plain", "read"): [100.0]}, drivers={"aes-xts-plain": "xts(ecb(aes-generic))"}
    )
    text = render_comparison(compare([w, wo], "aesni", "noaesni"))
    lines = text.splitlines()
    assert lines[0].split() == [
        "OP",
        "CIPHER",
        "aesni",
        "MB/s",
        "noaesni",
        "MB/s",
        "SPEEDUP",
        "aesni",
        "DRIVER",
        "noaesni",
        "DRIVER",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == [
        "read",
        "aes-xts-plain",
        "150.0",
        "100.0",
        "+50%",
        "xts-aes-aesni",
        "xts(ecb(aes-generic))",
    ]
    # the write row has no without-side: shown as "-", never as 0 or a bogus speedup
    assert lines[3].split() == ["write", "aes-xts-plain", "60.0", "-", "-", "xts-aes-aesni", "-"]
    # numeric columns are right-aligned: the rate cells end in the same column on every row
    end = lines[0].index("SPEEDUP") + len("SPEEDUP")
    assert lines[2][:end].endswith("+50%") and lines[3][:end].endswith("-")
    assert lines[-1].startswith("with aesni, reads 50% faster")


def test_render_rates_table() -> None:
    res = result("aesni", {("aes-xts-plain", "read"): [100.0, 120.0]}, drivers={})
    lines = render_rates(aggregate([res])).splitlines()
    assert lines[0].split()[:4] == ["PROFILE", "CIPHER", "OP", "MEAN"]
    assert lines[2].split() == ["aesni", "aes-xts-plain", "read", "110.0", "100.0", "120.0", "2", "?"]


def test_stats_serialise_to_plain_json_values() -> None:
    res = result("aesni", {("aes-xts-plain", "read"): [100.0]})
    comp = compare([res], "aesni", "noaesni")
    d = comp.to_dict()
    assert d["rows"][0]["with"]["mean_bytes_per_second"] == pytest.approx(100 * MB)
    assert d["rows"][0]["without"] is None and d["rows"][0]["speedup_percent"] is None
    assert json.loads(json.dumps(d)) == d


def test_plot_writes_two_panel_png(tmp_path: Path) -> None:
    from PIL import Image

    from exporter.render.plot import plot_comparison

    ciphers = ["aes-ecb-plain", "aes-cbc-plain", "aes-xts-plain"]
    w = result("aesni", {(c, op): [100.0 + i] for i, c in enumerate(ciphers) for op in ("read", "write")})
    wo = result("noaesni", {(c, op): [50.0] for c in ciphers[:2] for op in ("read", "write")})
    out = plot_comparison(compare([w, wo], "aesni", "noaesni", ciphers), tmp_path / "chart.png")
    with Image.open(out) as img:
        assert img.format == "PNG"
        width, height = img.size
        assert width >= 800 and height >= 400
        # not a blank canvas: bars in both colours were drawn
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20) or []}
    assert (0x2A, 0x7A, 0xB0) in colours and (0xE0, 0x8A, 0x2C) in colours


def test_plot_unwritable_path_is_a_plot_error(tmp_path: Path) -> None:
    from exporter.render.plot import PlotError, check_available

    with pytest.raises(PlotError, match="does not exist"):
        check_available(tmp_path / "missing-dir" / "chart.png")


def _three_rounds() -> list[CanaryResult]:
    ciphers = ["aes-ecb-plain", "aes-xts-plain"]
    w = result("aesni", {(c, op): [100.0, 106.0, 97.0] for c in ciphers for op in ("read", "write")})
    wo = result("noaesni", {(c, op): [40.0, 45.0, 38.0] for c in ciphers for op in ("read", "write")})
    return [w, wo]


def test_rows_carry_the_speedup_interval_in_json_and_text() -> None:
    comp = compare(_three_rounds(), "aesni", "noaesni")
    row = comp.to_dict()["rows"][0]
    assert row["ratio_lower"] < row["ratio"] < row["ratio_upper"] and row["confidence"] == 0.95
    lo, hi = row["with"]["mean_ci_lower_bytes_per_second"], row["with"]["mean_ci_upper_bytes_per_second"]
    assert lo < row["with"]["mean_bytes_per_second"] < hi
    assert row["with"]["rates_bytes_per_second"] == [100 * MB, 106 * MB, 97 * MB]
    text = render_comparison(comp)
    assert "95% confidence intervals" in text
    span = comp.rows[0].speedup_percent_interval
    assert span is not None and f"{span[0]:+.0f}%..{span[1]:+.0f}%" in text
    # one round per side: no interval to show, and the table says nothing it cannot support
    single = compare(
        [result("aesni", {("c", "read"): [100.0]}), result("noaesni", {("c", "read"): [50.0]})],
        "aesni",
        "noaesni",
    )
    assert "confidence" not in render_comparison(single)
    assert single.to_dict()["rows"][0]["ratio_lower"] is None


def test_figure_has_error_bars_one_y_scale_and_says_what_it_measured(tmp_path: Path) -> None:
    from PIL import Image

    from exporter.render.plot import PlotContext, build_figure, plot_comparison

    comp = compare(_three_rounds(), "aesni", "noaesni")
    tcg = PlotContext("tcg", "AMD EPYC 7763", 64, 3)
    fig = build_figure(comp, tcg)
    try:
        read_ax, write_ax = fig.axes[:2]
        assert read_ax.get_ylim() == write_ax.get_ylim()  # one shared scale
        from matplotlib.container import BarContainer

        for ax in (read_ax, write_ax):
            bars = [c for c in ax.containers if isinstance(c, BarContainer)]
            assert len(bars) == 2 and all(b.errorbar is not None for b in bars)  # error bars on every bar
        texts = {t.get_gid(): t.get_text() for t in fig.texts}
        assert "accelerator: tcg" in texts["context"] and "host CPU: AMD EPYC 7763" in texts["context"]
        assert "RAM disk: 64 MiB" in texts["context"] and "rounds: 3" in texts["context"]
        assert "TCG" in texts["tcg-warning"] and "real hardware" in texts["tcg-warning"]
        labels = [a.get_text() for a in read_ax.texts]
        assert all("%" in lab and "[" in lab for lab in labels)  # speedup with its interval per group
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    out = plot_comparison(comp, tmp_path / "chart.png", context=tcg)
    with Image.open(out) as img:
        meta = dict(img.text)  # type: ignore[attr-defined]
    assert meta["Accelerator"] == "tcg" and meta["Host CPU"] == "AMD EPYC 7763"
    assert meta["RAM disk"] == "64 MiB" and meta["Rounds"] == "3" and "real hardware" in meta["Warning"]

    kvm = build_figure(comp, PlotContext("kvm", "AMD EPYC 7763", 20480, 10))
    try:
        assert "tcg-warning" not in {t.get_gid() for t in kvm.texts}
    finally:
        import matplotlib.pyplot as plt

        plt.close(kvm)


@pytest.mark.parametrize("accelerator", ["tcg", "kvm,tcg"])
def test_tcg_warning_fits_the_figure_between_title_and_axes(accelerator: str) -> None:
    """The warning box was wrapped on a character-count guess and clipped at both edges of the PNG:
    the drawn box (text plus padding) must lie inside the figure, below the title, above the axes."""
    from exporter.render.plot import PlotContext, build_figure

    comp = compare(_three_rounds(), "aesni", "noaesni")
    fig = build_figure(comp, PlotContext(accelerator, "AMD EPYC 7763", 64, 3))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (warning,) = [t for t in fig.texts if t.get_gid() == "tcg-warning"]
        box = warning.get_bbox_patch().get_window_extent(renderer)
        assert 0 <= box.x0 < box.x1 <= fig.bbox.width, (box, fig.bbox)
        title = fig._suptitle.get_window_extent(renderer)
        assert box.y1 <= title.y0, (box, title)
        for ax in fig.axes[:2]:
            assert ax.get_tightbbox(renderer).y1 <= box.y0, (ax.get_tightbbox(renderer), box)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
