"""The web page in a real browser: Playwright for Python driving headless Chromium (Debian's `chromium`, installed by
.ci/run; Playwright's own browser download is not used) against a real server (real encoders, a real index, real
HTTP, an API key configured). It links a typed mention (with the mention marked by selecting words of the sentence),
uploads a real image from the data folder (file picker, and drag and drop), sees the ranked entities with their term
bars, the KG image, the word heatmap and the patch shading, sees a readable message for an unsupported image, and
for a missing key.

Screenshots go to EL_UI_SCREENSHOTS_DIR (default: a temporary folder). The README's are made with
`EL_UI_SCREENSHOTS_DIR=reports/ui EL_UI_TEST_INDEX_DIR=artifacts/index/default pytest -m browser`, which serves the
full 40,942-entity index instead of the session's small one.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.server_process import launch, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

KEY = "k-ui-test-7f3a"
SENTENCE = "Douglas Adams wrote The Hitchhiker's Guide to the Galaxy in 1979."
MENTION = "Douglas Adams"


def chromium_path() -> str | None:
    for cand in (os.environ.get("EL_TEST_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if cand and Path(cand).exists():
            return cand
    return None


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = Path(os.environ.get("EL_UI_SCREENSHOTS_DIR") or tmp_path_factory.mktemp("ui-shots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def server(settings):
    overrides: dict[str, object] = {"EL_AUTH__API_KEYS": KEY}
    if index_dir := os.environ.get("EL_UI_TEST_INDEX_DIR"):  # the README's screenshots: the full default index
        overrides["EL_INDEX__DIR"] = str(Path(index_dir).resolve())
    srv = wait_until(launch(settings, overrides))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e .[browser] (as .ci/run does)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no chromium executable: apt-get install -y chromium (as .ci/run does)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server) -> Iterator:
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # Offline: the page must fetch nothing but the service itself.
    remote: list[str] = []
    pg.on("request", lambda r: None if r.url.startswith(server.base_url) or r.url.startswith(("blob:", "data:"))
          else remote.append(r.url))
    pg.goto(server.base_url + "/")
    assert pg.url == server.base_url + "/ui/"
    pg.wait_for_selector("#status.ok")
    yield pg
    assert errors == [], f"script errors on the page: {errors}"
    assert remote == [], f"the page fetched from outside the service: {remote}"
    ctx.close()


def mark_mention(pg, sentence: str, mention: str) -> None:
    """Type the sentence, then select the mention's words in it with the keyboard, as a user would."""
    pg.fill("#sentence", sentence)
    start = sentence.index(mention)
    pg.focus("#sentence")
    pg.evaluate("([s, e]) => document.querySelector('#sentence').setSelectionRange(s, e)",
                [start, start + len(mention)])
    pg.keyboard.press("Shift+ArrowRight")  # extend the selection by one character, then back: a real keyup
    pg.keyboard.press("Shift+ArrowLeft")


def use_key(pg) -> None:
    pg.fill("#api-key", KEY)
    pg.dispatch_event("#api-key", "change")


def link(pg) -> None:
    pg.click("#link-btn")
    pg.wait_for_function("() => !document.querySelector('#link-btn').disabled")


def canvas_ink(pg, selector: str) -> int:
    """How many pixels of the first canvas matching selector are not white / transparent."""
    return pg.evaluate("""(sel) => {
        const c = document.querySelector(sel);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && (d[i] < 240 || d[i + 1] < 240 || d[i + 2] < 240)) n++;
        return n;
    }""", selector)


def test_api_key_is_asked_for_then_used(page, shots: Path) -> None:
    page.wait_for_selector("#api-key.required")  # the page read from /openapi.json that this server wants a key
    assert page.get_attribute("#top-k", "max") == "100"  # and its top_k cap (EL_LIMITS__MAX_TOP_K)
    mark_mention(page, SENTENCE, MENTION)
    assert page.input_value("#mention") == MENTION  # marked by the selection
    link(page)
    err = page.inner_text("#error")
    assert "API key is needed" in err and "(" in err  # the readable line, then the server's own message
    assert page.is_hidden("#result")
    page.screenshot(path=str(shots / "error-no-key.png"))
    use_key(page)
    link(page)
    assert page.is_hidden("#error")
    assert page.locator("#entities li.entity").count() >= 1


def test_link_a_typed_mention(page, shots: Path) -> None:
    use_key(page)
    mark_mention(page, SENTENCE, MENTION)
    page.fill("#top-k", "3")
    link(page)
    entities = page.locator("#entities li.entity")
    assert entities.count() == 3
    first = entities.nth(0)
    assert first.locator(".name").inner_text() == "Douglas Adams"
    # One bar per score term and the final score; the OT bar is there.
    terms = first.locator("table.terms tr").all_inner_texts()
    labels = [t.split("\t")[0].strip() for t in terms]
    assert labels[0] == "retrieval" and "OT (Sinkhorn)" in labels and labels[-1] == "final score"
    assert len(labels) >= 9
    # Confidence shown as a percentage when the API gives one, else n/a; the NIL verdict.
    conf = page.inner_text("#confidence")
    assert conf == "n/a" or conf.endswith("%")
    assert page.inner_text("#verdict") in ("Linked", "NIL: probably not in this knowledge graph")
    # Description and KG image come from GET /v1/entities/{id} and /image.
    page.wait_for_function("() => document.querySelector('#entities li.entity .kg-image').naturalWidth > 0")
    assert "writer" in first.locator(".description").inner_text().lower() or first.locator(".description").inner_text()
    # The heatmap of words against words, drawn.
    assert first.locator(".alignment").is_visible()
    assert int(first.locator("canvas.heatmap").get_attribute("data-cells")) > 10
    assert canvas_ink(page, "#entities li.entity canvas.heatmap") > 500
    assert first.locator(".patches").is_hidden()  # no image: no patch picture
    bottom = page.evaluate("() => document.querySelectorAll('#entities li.entity')[1].getBoundingClientRect().bottom"
                           " + window.scrollY")
    page.screenshot(path=str(shots / "link-text.png"), full_page=True,
                    clip={"x": 0, "y": 0, "width": 1200, "height": bottom + 12})  # the form and two entities


def test_upload_an_image(page, shots: Path, mel_dir: Path) -> None:
    photo = mel_dir / "RichpediaMEL" / "images" / "Q42.jpg"  # a real photo from the data folder
    use_key(page)
    mark_mention(page, SENTENCE, MENTION)
    page.fill("#top-k", "3")
    page.set_input_files("#image-file", str(photo))
    # The preview <img> has no size (so is not "visible") until the browser has decoded the blob: wait for it.
    page.wait_for_selector("#image-preview", state="visible", timeout=10_000)
    assert "Q42.jpg" in page.inner_text("#image-name")
    link(page)
    first = page.locator("#entities li.entity").nth(0)
    assert first.locator(".name").inner_text() == "Douglas Adams"
    assert first.locator(".patches").is_visible()
    page.wait_for_function("() => document.querySelector('#entities li.entity .kg-image').naturalWidth > 0")
    page.wait_for_timeout(300)  # the patch canvases repaint once the KG image has loaded
    sel = "#entities li.entity canvas.patch-mention"
    assert canvas_ink(page, sel) > 10_000 and canvas_ink(page, "#entities li.entity canvas.patch-entity") > 10_000
    # Hovering a patch of the mention image reshades the entity image by where that patch's mass goes.
    before = page.evaluate("() => document.querySelector('#entities li.entity canvas.patch-entity').toDataURL()")
    first.locator("canvas.patch-mention").hover(position={"x": 112, "y": 70})  # scrolls it into view first
    after = page.evaluate("() => document.querySelector('#entities li.entity canvas.patch-entity').toDataURL()")
    assert before != after
    page.mouse.move(0, 0)
    page.wait_for_timeout(100)
    bottom = page.evaluate("() => document.querySelector('#entities li.entity').getBoundingClientRect().bottom"
                           " + window.scrollY")
    page.screenshot(path=str(shots / "link-image.png"), full_page=True,
                    clip={"x": 0, "y": 0, "width": 1200, "height": bottom + 12})  # the form and the top entity

    # Drag and drop: the same file dropped on the drop zone replaces the choice.
    data = base64.b64encode(photo.read_bytes()).decode()
    page.click("#image-clear")
    assert page.is_hidden("#image-box")
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.jpg', {type: 'image/jpeg'}));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""", data)
    assert "dropped.jpg" in page.inner_text("#image-name")
    link(page)
    assert page.locator("#entities li.entity .patches").first.is_visible()


def test_unsupported_image_reads_well(page, shots: Path, tmp_path: Path) -> None:
    gif = tmp_path / "photo.gif"
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "GIF")
    gif.write_bytes(buf.getvalue())
    use_key(page)
    mark_mention(page, SENTENCE, MENTION)
    page.set_input_files("#image-file", str(gif))
    link(page)
    err = page.inner_text("#error")
    assert err.startswith("This image format is not supported: use a JPEG, PNG or WebP image.")
    assert "GIF" in err
    assert page.is_hidden("#result")
    page.screenshot(path=str(shots / "error-unsupported-image.png"))


def test_explain_and_entity_image_over_http(server, mel_dir: Path) -> None:
    """What the page draws, from the real server: explain=true over multipart with a real photo, and the KG image."""
    auth = {"Authorization": f"Bearer {KEY}"}
    photo = (mel_dir / "RichpediaMEL" / "images" / "Q42.jpg").read_bytes()
    with server.client() as c:
        r = c.post("/v1/link?explain=true", headers=auth, data={"mention": MENTION, "context": SENTENCE, "top_k": "5"},
                   files={"image": ("q42.jpg", photo, "image/jpeg")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["explain"]) == 3 and [a["id"] for a in body["explain"]] == [e["id"] for e in body["entities"][:3]]
        for a, e in zip(body["explain"], body["entities"]):
            assert a["rerank_score"] == pytest.approx(e["rerank_score"])
            assert a["rerank_score"] == pytest.approx((a["text_term"] + a["visual_term"]) / 6, abs=1e-5)
            t = a["text"]
            assert len(t["plan"]) == len(t["mention_tokens"]) and len(t["plan"][0]) == len(t["entity_tokens"])
            assert sum(map(sum, t["plan"])) == pytest.approx(1.0, abs=1e-3)
            assert a["image"]["grid"] == [7, 7] and len(a["image"]["plan"]) == 49
        assert len(r.content) < 300_000  # bounded
        plain = c.post("/v1/link", headers=auth, json={"mention": MENTION, "context": SENTENCE, "top_k": 5}).json()
        assert "explain" not in plain

        r = c.get("/v1/entities/Q42/image", headers=auth)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        img = Image.open(io.BytesIO(r.content))
        assert img.format == "JPEG" and max(img.size) <= 320
        assert c.get("/v1/entities/Q42/image").status_code == 401  # the API keeps its key
