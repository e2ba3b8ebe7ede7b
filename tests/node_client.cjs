// A streaming chat through the real OpenAI Node SDK, for tests/test_client_deadlines.py.
// Input: JSON in argv[2] {baseURL, model, timeout, maxRetries}. Output: one JSON line.
const OpenAI = require("openai");

async function main() {
  const args = JSON.parse(process.argv[2]);
  const client = new OpenAI({
    baseURL: args.baseURL,
    apiKey: "sk-test",
    timeout: args.timeout,
    maxRetries: args.maxRetries,
  });
  const started = Date.now();
  const out = { chunks: 0, text: "", models: [], error: null, elapsed_ms: 0 };
  try {
    const stream = await client.chat.completions.create({
      model: args.model,
      stream: true,
      messages: [{ role: "user", content: "Tell me a story." }],
    }, { headers: { "x-request-id": args.requestId } });
    for await (const chunk of stream) {
      if (!out.models.includes(chunk.model)) out.models.push(chunk.model);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        out.chunks += 1;
        out.text += delta.content;
      }
    }
  } catch (err) {
    out.error = { name: err.constructor.name, status: err.status ?? null, message: String(err.message) };
  }
  out.elapsed_ms = Date.now() - started;
  process.stdout.write(JSON.stringify(out) + "\n");
}

main();
