import type { Problem } from "./types.js";

/**
 * The sidecar answered with an RFC 9457 problem (or something that was not one, turned into one).
 * `problem` is the body as the contract types it; `status` mirrors `problem.status`.
 *
 *     try { await ai.qualifyLead({ lead_id }) }
 *     catch (e) { if (e instanceof SidecarProblem && e.status === 403) ... e.problem.detail ... }
 */
export class SidecarProblem extends Error {
  override readonly name = "SidecarProblem";
  readonly status: number;
  /** The slug at the end of `problem.type` (`urn:problem:crm-ai:forbidden` → `forbidden`). */
  readonly slug: string;

  constructor(
    readonly problem: Problem,
    /** The HTTP response, when the problem came as one (not for an `error` event of a stream). */
    readonly response?: Response,
  ) {
    super(`${problem.title}: ${problem.detail}`);
    this.status = problem.status;
    this.slug = /[^/:#]*$/.exec(problem.type)?.[0] || problem.type;
  }
}

/** A job's or batch's event stream broke its protocol or could not be resumed (never an HTTP problem: see SidecarProblem). */
export class SidecarStreamError extends Error {
  override readonly name = "SidecarStreamError";
}

/** The problem in a failed response's body; a body that is not a problem (a proxy's HTML page) becomes one. */
export function problemOf(body: unknown, response: Response): Problem {
  if (isProblem(body)) return body;
  const text = typeof body === "string" ? body.trim().slice(0, 200) : "";
  return {
    type: "about:blank",
    title: response.statusText || `HTTP ${response.status}`,
    status: response.status,
    detail: text || `the server answered ${response.status} without a problem body`,
  };
}

export function isProblem(value: unknown): value is Problem {
  if (typeof value !== "object" || value === null) return false;
  const p = value as Record<string, unknown>;
  return typeof p.type === "string" && typeof p.title === "string" && typeof p.status === "number" && typeof p.detail === "string";
}
