// Compiles Exchanges.sol with solc-js (the compiler ships inside the npm package: nothing is
// downloaded) and prints {<contract>: {abi, bytecode}} as JSON on stdout.
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const source = fs.readFileSync(path.join(__dirname, "Exchanges.sol"), "utf8");
const input = {
  language: "Solidity",
  sources: { "Exchanges.sol": { content: source } },
  settings: { outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } } },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === "error");
if (errors.length) {
  console.error(errors.map((e) => e.formattedMessage).join("\n"));
  process.exit(1);
}
const result = {};
for (const [name, contract] of Object.entries(output.contracts["Exchanges.sol"])) {
  result[name] = { abi: contract.abi, bytecode: "0x" + contract.evm.bytecode.object };
}
process.stdout.write(JSON.stringify(result));
