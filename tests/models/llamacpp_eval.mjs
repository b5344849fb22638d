// llama.cpp (node-llama-cpp's prebuilt CPU build) reads a GGUF file: argv = node-llama-cpp's directory, the
// GGUF path, and a JSON request {"ids": [...], "texts": ["...", ...], "lora": "adapter.gguf", "generate": n}.
// Prints JSON: "probs", llama.cpp's next-token distribution after ids (with the LoRA adapter applied at scale 1,
// if given) as [[id, p], ...], or with "generate" the n tokens it picks greedily after ids; "tokens", its ids
// for each text (no BOS, no specials).
import {pathToFileURL} from "node:url";
import path from "node:path";

const [moduleDir, ggufPath, requestJson] = process.argv.slice(2);
const {getLlama} = await import(pathToFileURL(path.join(moduleDir, "dist", "index.js")).href);
const request = JSON.parse(requestJson);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: ggufPath});
const out = {tokens: (request.texts || []).map((text) => Array.from(model.tokenize(text, false)))};
if (request.ids) {
    const lora = request.lora ? {adapters: [{filePath: request.lora, scale: 1}]} : undefined;
    const size = request.ids.length + (request.generate || 1);
    const context = await model.createContext({contextSize: Math.max(32, size), lora});
    const last = request.ids.length - 1;
    const steps = request.ids.map((id, i) => i === last ? [id, {generateNext: {probabilities: true}}] : id);
    if (request.generate) {
        out.generated = [];
        for await (const token of context.getSequence().evaluate(request.ids, {temperature: 0})) {
            out.generated.push(token);
            if (out.generated.length >= request.generate) break;
        }
    } else {
        const result = await context.getSequence().controlledEvaluate(steps);
        out.probs = Array.from(result[last].next.probabilities.entries());
    }
}
process.stdout.write(JSON.stringify(out));
await llama.dispose();
