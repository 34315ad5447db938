// Render ```mermaid fences (emitted as <div class="mermaid">) in the browser, from a copy
// served with the site: no network needed. See js/mermaid/VENDORED.txt for what it holds.
import mermaid from "./mermaid/mermaid.esm.min.mjs";

mermaid.initialize({ startOnLoad: true });
