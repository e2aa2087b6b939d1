// Starts Kuzzle from this folder (its .kuzzlerc) as `node start.js`; scripts/kuzzle.sh
// runs it. One adaptation: Kuzzle asks the engine's `GET /` for its version at start,
// which the test distribution of Elasticsearch answers with 405 (it lacks the
// rest-root module); on a 405, `info()` builds the same answer from `GET /_nodes/_local`.
"use strict";

const { Client } = require("sdk-es8");
const { Backend } = require("kuzzle");

const info = Client.prototype.info;
Client.prototype.info = async function (params, options) {
  try {
    return await info.call(this, params, options);
  } catch (error) {
    if (error.meta?.statusCode !== 405) throw error;
    const { cluster_name, nodes } = await this.nodes.info({ node_id: "_local" });
    const [id, node] = Object.entries(nodes)[0];
    return {
      name: node.name,
      cluster_name,
      version: {
        number: node.version,
        build_flavor: node.build_flavor,
        build_type: node.build_type,
        build_hash: node.build_hash,
        lucene_version: undefined,
      },
      tagline: "You Know, for Search",
      node_id: id,
    };
  }
};

new Backend("kuzzle").start().catch((error) => {
  console.error(error);
  process.exit(1);
});
