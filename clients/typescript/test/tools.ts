// Calling taskpods's MCP tools through the official SDK's client, shared by the stdio and HTTP tests.

import assert from "node:assert/strict";

import type { Client } from "@modelcontextprotocol/sdk/client/index.js";

/** A tool's answer as the SDK returns it. */
export interface ToolAnswer {
  isError?: boolean;
  content: { type: string; text: string }[];
  structuredContent?: Record<string, unknown>;
}

/** `call` answers whatever the tool says; `ok` asserts success (the text says what the structure does). */
export function toolCaller(client: () => Client) {
  const call = async (name: string, args: Record<string, unknown>): Promise<ToolAnswer> =>
    (await client().callTool({ name, arguments: args }, undefined, { timeout: 120_000 })) as ToolAnswer;
  const ok = async (name: string, args: Record<string, unknown>): Promise<Record<string, unknown>> => {
    const answer = await call(name, args);
    assert.ok(!answer.isError, `${name} failed: ${answer.content[0]?.text}`);
    assert.deepEqual(JSON.parse(answer.content[0].text), answer.structuredContent);
    return answer.structuredContent ?? {};
  };
  return { call, ok };
}
