// The conversation lives here and is sent whole each turn (the server keeps no history).
"use strict";

const KEY_STORE = "infopt-api-key";
const log = document.getElementById("log");
const input = document.getElementById("input");
const sendButton = document.getElementById("send");
let messages = [];
let controller = null; // aborts the answer being streamed

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function setState(state) {
  document.body.dataset.state = state;
  sendButton.textContent = state === "streaming" ? "Stop" : "Send";
}

// A server started with --api-key asks for it once; it is kept for this tab only.
async function post(path, body) {
  for (let attempt = 0; ; attempt++) {
    const headers = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) headers.Authorization = "Bearer " + key;
    const res = await fetch(path, { method: "POST", headers, body: JSON.stringify(body), signal: controller.signal });
    if (res.status !== 401 || attempt > 0) return res;
    const entered = window.prompt("This server needs an API key:");
    if (!entered) return res;
    sessionStorage.setItem(KEY_STORE, entered);
  }
}

// Server-sent events: "data: {json}" blocks separated by blank lines, closed by "data: [DONE]".
async function readEvents(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  const turn = messages; // a reset during the answer starts a new list; this turn stays in its own
  turn.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant", "");
  controller = new AbortController();
  setState("streaming");
  try {
    const res = await post("/v1/chat/completions", { messages: turn, stream: true });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || res.status + " " + res.statusText);
    }
    await readEvents(res, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
      if (delta) {
        answer.textContent += delta;
        log.scrollTop = log.scrollHeight;
      }
    });
    turn.push({ role: "assistant", content: answer.textContent });
  } catch (err) {
    if (err.name === "AbortError") {
      turn.push({ role: "assistant", content: answer.textContent });
    } else {
      turn.pop(); // the turn failed: its text goes back to the box, to edit and send again
      if (!input.value) input.value = text;
      answer.remove();
      bubble("error", String(err.message || err));
    }
  } finally {
    answer.classList.add("done");
    controller = null;
    setState("idle");
  }
}

document.getElementById("form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (controller) return controller.abort();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  send(text);
});

input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    document.getElementById("form").requestSubmit();
  }
});

document.getElementById("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  log.replaceChildren();
  input.focus();
});

fetch("/health").then((r) => r.json()).then((h) => {
  document.getElementById("model").textContent = h.model + " · " + h.slots + " slots";
}).catch(() => {});
