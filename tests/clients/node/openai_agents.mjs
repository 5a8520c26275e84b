// OpenAI's Agents SDK for JavaScript (@openai/agents) with one tool: `node openai_agents.mjs BASE_URL MODEL API
// [stream]`, API being `chat` (OpenAIChatCompletionsModel on /v1/chat/completions) or `responses` (the SDK's default
// model, OpenAIResponsesModel on /v1/responses, with the SDK's default client and the model a plain name, as an
// application that only points the SDK at another base URL has it). `stream`: run with { stream: true }. The first
// turn has toolChoice "required" (the SDK resets it once the tool has run, so the next turn answers). Prints one JSON
// line, or the error.
import {
  Agent, OpenAIChatCompletionsModel, OpenAIProvider, run, setDefaultOpenAIClient, setOpenAIAPI, setTracingDisabled,
  tool,
} from "@openai/agents";
import OpenAI from "openai";
import { z } from "zod";

setTracingDisabled(true);
const [baseURL, modelId, api, mode] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 120_000 });
let model = new OpenAIChatCompletionsModel(client, modelId);
if (api === "responses") {
  setDefaultOpenAIClient(client);
  setOpenAIAPI("responses");
  model = modelId; // a name: the default provider makes it an OpenAIResponsesModel on the client above
}
const getWeather = tool({
  name: "get_weather",
  description: "The current weather in a city.",
  parameters: z.object({ city: z.string() }),
  execute: async ({ city }) => `sunny, 21 C in ${city}`,
});
const agent = new Agent({
  name: "weather",
  instructions: "You answer questions about the weather.",
  tools: [getWeather],
  model,
  // One call per turn: with parallel calls allowed, "required" lets the small model repeat its call to maxTokens.
  // A response cut at max_output_tokens is "incomplete", which the SDK throws on, so the answer has room to end.
  modelSettings: { toolChoice: "required", parallelToolCalls: false, temperature: 0, maxTokens: 128 },
});

try {
  let result;
  if (mode === "stream") {
    result = await run(agent, "What is the weather in Paris?", { maxTurns: 4, stream: true });
    for await (const _ of result) { /* drain the events */ }
    await result.completed;
    if (result.error) throw result.error;
  } else {
    result = await run(agent, "What is the weather in Paris?", { maxTurns: 4 });
  }
  const items = result.newItems.map((item) => {
    if (item.type === "tool_call_item") return { tool_call: item.rawItem.name, arguments: item.rawItem.arguments };
    if (item.type === "tool_call_output_item") return { tool_output: item.output };
    return { item: item.type };
  });
  const modelClass = typeof model === "string" ? (await new OpenAIProvider().getModel(modelId)).constructor.name
    : model.constructor.name;
  console.log(JSON.stringify({ final_output: result.finalOutput, items, model_class: modelClass }));
} catch (error) {
  console.log(JSON.stringify({ error: `${error?.name}: ${error?.message}`.slice(0, 2000) }));
  process.exit(1);
}
