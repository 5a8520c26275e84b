// OpenAI's Agents SDK for JavaScript (@openai/agents) on chat completions (OpenAIChatCompletionsModel, not the
// Responses API) with one tool: `node openai_agents.mjs BASE_URL MODEL`. The first turn has toolChoice "required"
// (the SDK resets it once the tool has run, so the next turn answers). Prints one JSON line, or the error.
import { Agent, OpenAIChatCompletionsModel, run, setTracingDisabled, tool } from "@openai/agents";
import OpenAI from "openai";
import { z } from "zod";

setTracingDisabled(true);
const [baseURL, modelId] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 120_000 });
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
  model: new OpenAIChatCompletionsModel(client, modelId),
  // One call per turn: with parallel calls allowed, "required" lets the small model repeat its call to max_tokens.
  modelSettings: { toolChoice: "required", parallelToolCalls: false, temperature: 0, maxTokens: 64 },
});

try {
  const result = await run(agent, "What is the weather in Paris?", { maxTurns: 4 });
  const items = result.newItems.map((item) => {
    if (item.type === "tool_call_item") return { tool_call: item.rawItem.name, arguments: item.rawItem.arguments };
    if (item.type === "tool_call_output_item") return { tool_output: item.output };
    return { item: item.type };
  });
  console.log(JSON.stringify({ final_output: result.finalOutput, items }));
} catch (error) {
  console.log(JSON.stringify({ error: `${error?.name}: ${error?.message}`.slice(0, 2000) }));
  process.exit(1);
}
