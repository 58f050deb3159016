"""Write pipeline.ipynb from pipeline.py: the same code cells, plus cells to explore.

    python examples/twitter_stocks/make_notebook.py

pipeline.py is the source; the tests fail when the notebook's code drifts from it. The notebook
adds markdown headers and `# streamfn: ignore` cells (look at the data, try stages, run, plot).
"""
import re
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
src = (HERE / "pipeline.py").read_text(encoding="utf-8")
doc_end = src.index('"""', 3) + 3
body = src[doc_end:].strip("\n")
parts = re.split(r"\n(?=# -- \d\. )", body)
head, sections = parts[0], parts[1:]
head = head.replace('HERE = Path(__file__).resolve().parent',
                    'HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # Jupyter: cwd')
cells = [new_markdown_cell(
    "# Stock prices and posts: sentiment, 1-minute windows, a join, served\n\n"
    "The same pipeline as `pipeline.py`, as a notebook. Run it with\n\n"
    "```console\n$ streamfn run examples/twitter_stocks/pipeline.ipynb\n```\n\n"
    "Cells whose first line is `# streamfn: ignore` are for exploring here; `streamfn run` leaves them out. "
    "See README.md for what each part does and the settings."),
    new_code_cell(head.strip("\n")),
    new_code_cell("# streamfn: ignore\n"
                  "# the shipped data: trades per symbol, and posts (one JSON object per line; some bad on purpose)\n"
                  "print(pl.read_csv(DATA / \"quotes.csv\").head())\n"
                  "for line in (DATA / \"posts.jsonl\").read_bytes().splitlines()[:3]:\n"
                  "    print(line)"),
]
titles = {"1": "## 1. The replay, published to Kafka and read back", "2": "## 2. Prices per symbol and minute", "3": "## 3. Posts",
          "4": "## 4. Sentiment next to price", "5": "## 5. `GET /symbols/{symbol}`", "6": "## 6. Outputs"}
for section in sections:
    number = section[5]
    cells.append(new_markdown_cell(titles[number]))
    cells.append(new_code_cell(section.strip("\n")))
    if number == "3":
        cells.append(new_code_cell(
            "# streamfn: ignore\n"
            "# try the post stages on a few lines: stages are plain functions\n"
            "sample = pl.DataFrame({\"value\": [b'{\"id\": 1, \"ts\": \"2026-03-02T14:31:05.000Z\", \"user\": \"a\", '\n"
            "                                  b'\"text\": \"$TSLA and $AAPL look great today\"}']})\n"
            "mentions(posts(sample))"))
        cells.append(new_code_cell(
            "# streamfn: ignore\n"
            "try:\n"
            "    posts(pl.DataFrame({\"value\": [b'{\"id\": 2, \"ts\": \"2026-03-02T14:31:06.000Z\", \"user\": \"b\", \"text\": \"\"}']}))\n"
            "except BadPost as exc:\n"
            "    print(\"dead letter:\", exc)"))
cells.append(new_markdown_cell("## Run it here, and look at it"))
cells.append(new_code_cell(
    "# streamfn: ignore\n"
    "summary = p.run()\n"
    "print(summary)"))
cells.append(new_code_cell(
    "# streamfn: ignore\n"
    "import report\n"
    "symbols = [\"AAPL\", \"TSLA\", \"NVDA\"]\n"
    "report.plot(report.read(OUTPUT, \"prices\", symbols), report.read(OUTPUT, \"joined\", symbols), symbols, \"report.png\")"))
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                         "language_info": {"name": "python"}})
for number, cell in enumerate(nb.cells):
    cell.id = f"cell-{number:02d}"  # stable ids: regenerating changes only what changed
nbformat.validate(nb)
nbformat.write(nb, str(HERE / "pipeline.ipynb"))
print(f"wrote {HERE / 'pipeline.ipynb'}: {len(cells)} cells")
