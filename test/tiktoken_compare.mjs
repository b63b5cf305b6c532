// tiktoken_compare.mjs: the JavaScript side of test/tiktoken_compare.sh and bench/bench_prepro.sh.
//
//   node tiktoken_compare.mjs NODE_DIR text.txt ids.txt   compares js-tiktoken's gpt2 encoding of
//                                                         text.txt with our ids (one per line)
//   node tiktoken_compare.mjs NODE_DIR text.txt --bench   prints "tokens N seconds S tokens_per_s R"
//
// NODE_DIR is the folder where `npm install --prefix NODE_DIR js-tiktoken` put the package.
// The text is encoded with no special tokens: "<|endoftext|>" in it is ordinary text, as in ours.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const [nodeDir, textPath, third] = process.argv.slice(2);
const { getEncoding } = createRequire(join(nodeDir, "package.json"))("js-tiktoken");
const enc = getEncoding("gpt2");
const text = readFileSync(textPath, "utf8");

if (third === "--bench") {
  let best = Infinity, n = 0;
  for (let run = 0; run < 3; run++) {  // best of 3, like the C side
    const t0 = process.hrtime.bigint();
    n = enc.encode(text, [], []).length;
    const dt = Number(process.hrtime.bigint() - t0) / 1e9;
    best = Math.min(best, dt);
  }
  console.log(`tokens ${n} seconds ${best.toFixed(4)} tokens_per_s ${Math.round(n / best)}`);
} else {
  const theirs = enc.encode(text, [], []);
  const ours = readFileSync(third, "utf8").split("\n").filter((s) => s !== "").map(Number);
  const n = Math.min(ours.length, theirs.length);
  let i = 0;
  while (i < n && ours[i] === theirs[i]) i++;
  if (i === n && ours.length === theirs.length) {
    console.log(`same ${ours.length} tokens`);
  } else {
    const show = (ids) => JSON.stringify(ids.slice(Math.max(0, i - 3), i + 5).map((id) => [id, enc.decode([id])]));
    console.log(`differ at token ${i} (ours ${ours.length} tokens, js-tiktoken ${theirs.length})`);
    console.log(`  ours:        ${show(ours)}`);
    console.log(`  js-tiktoken: ${show(theirs)}`);
    process.exit(1);
  }
}
