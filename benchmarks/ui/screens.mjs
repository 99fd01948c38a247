// What a user meets in the MLflow and Prefect UIs, checked in a real (headless) browser:
//
//   cd benchmarks/ui && npm install && node screens.mjs [OUT_DIR]     (services up, a pipeline run recorded)
//
// For each page: the address the UI ends on, a screenshot (OUT_DIR/<name>.png) and whether the texts a user
// looks for are on it. Prints one JSON object; exits 1 if a check fails. Chromium comes from the npm package
// @sparticuz/chromium (a packaged binary: nothing is downloaded from a browser CDN).
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";

const outDir = process.argv[2] || "/tmp/clara-ui";
const mlflow = process.env.MLFLOW_TRACKING_URI || "http://127.0.0.1:5000";
const prefect = (process.env.PREFECT_API_URL || "http://127.0.0.1:4200/api").replace(/\/api$/, "");
const ML = "workflowType=machine_learning";

async function api(path, body) {
  const r = await fetch(`${mlflow}/api/2.0/mlflow/${path}`, body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

const exp = (await api("experiments/get-by-name?experiment_name=clara")).experiment;
const runs = (await api("runs/search", { experiment_ids: [exp.experiment_id], max_results: 200,
  order_by: ["attributes.start_time DESC"] })).runs || [];
const tag = (run, key) => (run.data.tags || []).find(t => t.key === key)?.value;
// the latest pipeline run that did its stages' work (a fully reused run has no nested runs)
const parent = runs.find(r => tag(r, "clara.stage") === "pipeline" &&
  runs.some(s => tag(s, "mlflow.parentRunId") === r.info.run_id));
if (!parent) throw new Error("no pipeline run with stage runs yet: run `make pipeline` first");
const latest = runs.find(r => tag(r, "clara.stage") === "pipeline");  // may have reused every stage
const scp = runs.find(s => tag(s, "mlflow.parentRunId") === parent.info.run_id && tag(s, "clara.stage") === "pretrain_scp");
const prod = (await api("registered-models/alias?name=clara&alias=production")).model_version;
const e = exp.experiment_id;

const pages = [
  // [name, address, texts that must be on the page]
  ["experiment_default", `${mlflow}/#/experiments/${e}`, []],
  ["experiment_runs", `${mlflow}/#/experiments/${e}/runs?${ML}`, ["Runs", "Dataset", "pipeline ", "corpus/wiki_en"]],
  ["pipeline_run", `${mlflow}/#/experiments/${e}/runs/${latest.info.run_id}?${ML}`, ["Datasets", "corpus/wiki_en", "Corpus", "flows/pipeline.py"]],
  ["scp_run", `${mlflow}/#/experiments/${e}/runs/${scp.info.run_id}?${ML}`, ["Datasets", "synth/wiki_en/mix/scp", "Registered models", "clara-compressor"]],
  ["scp_charts", `${mlflow}/#/experiments/${e}/runs/${scp.info.run_id}/model-metrics?${ML}`, ["ce", "mse"]],
  ["production_version", `${mlflow}/#/models/clara/versions/${prod.version}?${ML}`, ["production", "data_version", "train_e2e"]],
  ["prefect_deployment", `${prefect}/deployments`, ["full-pipeline"]],
];

// a POSIX locale reaches the page as "en-US@posix", which Intl rejects (MLflow's GenAI view then fails to render)
const browser = await puppeteer.launch({ args: [...chromium.args, "--lang=en-US"], executablePath: await chromium.executablePath(),
  headless: true, env: { ...process.env, LANG: "en_US.UTF-8", LC_ALL: "en_US.UTF-8" } });
const page = await browser.newPage();
await page.setViewport({ width: 1600, height: 1000 });
const { mkdirSync } = await import("node:fs");
mkdirSync(outDir, { recursive: true });
const report = { latest_pipeline_run: latest.info.run_id, pipeline_run_with_stages: parent.info.run_id,
  production: prod.version, pages: {} };
let ok = true;
for (const [name, url, texts] of pages) {
  // a fresh document each time: a hash change alone keeps the app (and any error it is showing) loaded
  await page.goto("about:blank");
  await page.goto(url, { waitUntil: "networkidle0", timeout: 90000 });
  await new Promise(r => setTimeout(r, 3000));  // charts and tables render after the data arrives
  await page.screenshot({ path: `${outDir}/${name}.png` });
  const body = await page.evaluate(() => document.body.innerText);
  const missing = texts.filter(t => !body.includes(t));
  const crashed = body.includes("Something went wrong");
  ok = ok && missing.length === 0 && !crashed;
  report.pages[name] = { asked: url, shown: page.url(), missing, crashed, screenshot: `${outDir}/${name}.png` };
}
await browser.close();
console.log(JSON.stringify(report, null, 1));
process.exit(ok ? 0 : 1);
