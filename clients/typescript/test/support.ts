// What the client's test files share (not a test file itself: vitest runs `*.test.ts` only).
import { EventSource } from "eventsource";

import type { EventSourceConstructor } from "../src/index.js";

/** An EventSource that remembers its instances, to see what the client opened and closed. */
export function recordingEventSource() {
  const opened: EventSource[] = [];
  class Recording extends EventSource {
    constructor(url: string | URL, init?: EventSourceInit) {
      super(url, init);
      opened.push(this);
    }
  }
  return { opened, EventSource: Recording as EventSourceConstructor };
}
