// The Vercel AI SDK through the stack with @ai-sdk/openai-compatible (structured outputs on):
// `node ai_sdk.mjs BASE_URL MODEL CASE`, CASE one of
// - object: generateObject with a zod schema (response_format json_schema);
// - output: generateText with `output: Output.object(...)` (generateObject's successor, the same request);
// - tool: generateText with one tool, toolChoice "required" on the first step, "auto" on the second (the answer);
// - stream-tool: the same with streamText (tool calls read from streamed deltas).
// Prints one JSON line of what the SDK parsed, or the error.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, Output, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const [baseURL, modelId, kind] = process.argv.slice(2);
const provider = createOpenAICompatible({
  name: "llamaq", baseURL, apiKey: "unused", supportsStructuredOutputs: true,
});
const model = provider.chatModel(modelId);
const City = z.object({ name: z.string(), country: z.string() });
const prompt = 'Paris is the capital of France. Extract the city and its country, as {"name": ..., "country": ...}.';
const common = { model, temperature: 0, maxOutputTokens: 64, maxRetries: 0 };

async function run() {
  if (kind === "object") {
    const result = await generateObject({ ...common, schema: City, schemaName: "City", prompt });
    return { object: result.object, finishReason: result.finishReason, warnings: result.warnings ?? [] };
  }
  if (kind === "output") {
    const result = await generateText({ ...common, output: Output.object({ schema: City, name: "City" }), prompt });
    return { object: result.output, finishReason: result.finishReason, warnings: result.warnings ?? [] };
  }
  const options = {
    ...common,
    prompt: "What is the weather in Paris?",
    tools: {
      get_weather: tool({
        description: "The current weather in a city.",
        inputSchema: z.object({ city: z.string() }),
        execute: async ({ city }) => `sunny, 21 C in ${city}`,
      }),
    },
    toolChoice: "required",
    // The provider has no setting for it: its unknown provider options go into the request body as they are. One
    // call per turn: with parallel calls allowed, "required" lets the small model repeat its call to max_tokens.
    providerOptions: { llamaq: { parallel_tool_calls: false } },
    prepareStep: ({ stepNumber }) => (stepNumber > 0 ? { toolChoice: "auto" } : undefined),
    stopWhen: stepCountIs(2),
  };
  let result;
  if (kind === "stream-tool") {
    let streamError;
    const stream = streamText({ ...options, onError: ({ error }) => { streamError = error; } });
    for await (const _ of stream.fullStream) { /* drain */ }
    if (streamError) throw streamError;
    result = { steps: await stream.steps, text: await stream.text, warnings: await stream.warnings };
  } else {
    result = await generateText(options);
  }
  return {
    steps: result.steps.map((step) => ({
      toolCalls: step.toolCalls.map((c) => ({ toolName: c.toolName, input: c.input, invalid: c.invalid ?? false })),
      toolResults: step.toolResults.map((r) => ({ toolName: r.toolName, output: r.output })),
      text: step.text,
      finishReason: step.finishReason,
    })),
    text: result.text,
    warnings: result.warnings ?? [],
  };
}

try {
  console.log(JSON.stringify(await run()));
} catch (error) {
  console.log(JSON.stringify({ error: `${error?.name}: ${error?.message}`.slice(0, 2000),
                               responseBody: error?.responseBody?.slice?.(0, 1000) }));
  process.exit(1);
}
