// node --test reporter of the old-kernel guest: one JSON line per finished test (file, name,
// nesting, passed/failed/skipped and why, duration), read back by the host (harness.ts).
interface TestEvent {
  type: string;
  data: {
    name: string;
    nesting: number;
    file?: string;
    skip?: string | boolean;
    todo?: string | boolean;
    details?: { duration_ms?: number; error?: unknown };
  };
}

export default async function* reporter(source: AsyncIterable<TestEvent>): AsyncGenerator<string> {
  for await (const event of source) {
    if (event.type !== 'test:pass' && event.type !== 'test:fail') continue;
    const { name, nesting, file, skip, details } = event.data;
    const error = details?.error as { message?: string; cause?: { message?: string } } | undefined;
    yield `${JSON.stringify({
      file,
      name,
      nesting,
      result: event.type === 'test:fail' ? 'fail' : skip !== undefined && skip !== false ? 'skip' : 'pass',
      skip: typeof skip === 'string' ? skip : undefined,
      error: error ? (error.cause?.message ?? error.message ?? 'failed') : undefined,
      ms: Math.round(details?.duration_ms ?? 0),
    })}\n`;
  }
}
