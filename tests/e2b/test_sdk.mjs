// The unmodified `e2b` npm package against NovaSandbox's E2B API: create,
// run, a failing run, files, kill. Run by tests/e2b/run.sh (which sets
// E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY and NODE_PATH).
import { createRequire } from 'node:module'
const require = createRequire(process.env.E2B_NODE_MODULES + '/')
const { Sandbox, CommandExitError } = require('e2b')

const template = process.env.E2B_TEST_TEMPLATE || 'minimal'
const steps = []
function step(name, t0) {
  const ms = performance.now() - t0
  steps.push(name)
  console.log(`ok  ${('js: ' + name).padEnd(42)} ${ms.toFixed(0).padStart(8)} ms`)
}
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`)
}

let t = performance.now()
const sbx = await Sandbox.create(template, { timeoutMs: 120_000 })
step('Sandbox.create', t)
try {
  t = performance.now()
  const r = await sbx.commands.run('echo hi')
  check(r.exitCode === 0 && r.stdout === 'hi\n', JSON.stringify(r))
  step("commands.run('echo hi')", t)

  t = performance.now()
  try {
    await sbx.commands.run('echo oops >&2; exit 3')
    throw new Error('a failing command did not throw')
  } catch (e) {
    check(e instanceof CommandExitError, `${e}`)
    check(e.exitCode === 3 && e.stderr === 'oops\n', `${e.exitCode} ${JSON.stringify(e.stderr)}`)
  }
  step('failing command throws CommandExitError', t)

  t = performance.now()
  await sbx.files.write('/tmp/js/hello.txt', 'hello from js\n')
  check((await sbx.files.read('/tmp/js/hello.txt')) === 'hello from js\n', 'read back')
  const names = (await sbx.files.list('/tmp/js')).map((e) => e.name)
  check(names.length === 1 && names[0] === 'hello.txt', JSON.stringify(names))
  await sbx.files.remove('/tmp/js/hello.txt')
  check(!(await sbx.files.exists('/tmp/js/hello.txt')), 'removed')
  step('files write/read/list/remove', t)

  t = performance.now()
  await sbx.setTimeout(60_000)
  step('setTimeout', t)
} finally {
  t = performance.now()
  await sbx.kill()
  step('kill', t)
}
console.log(`e2b JS SDK against NovaSandbox: ${steps.length} steps passed`)
